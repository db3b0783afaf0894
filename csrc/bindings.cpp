// Python bindings: relaykern._C.{KVPool, BlockManager, OutOfBlocks}. std::invalid_argument becomes ValueError
// (pybind11's default mapping); relaykern::OutOfBlocks becomes _C.OutOfBlocks, a RuntimeError subclass.
#include <torch/extension.h>

#include "block_manager.h"
#include "kv_pool.h"

namespace py = pybind11;
using relaykern::BlockManager;
using relaykern::KVPool;

namespace {

at::Device to_device(const py::object& device) {  // accepts "cuda:0" as well as torch.device
  return py::module_::import("torch").attr("device")(device).cast<at::Device>();
}

at::Tensor block_tables(const BlockManager& bm, const std::vector<int64_t>& seq_ids, int64_t width) {
  if (width < 0) throw std::invalid_argument("block_tables: width must be >= 0, got " + std::to_string(width));
  at::Tensor out = torch::empty({static_cast<int64_t>(seq_ids.size()), width}, torch::kInt32);
  bm.write_block_tables(seq_ids, width, out.data_ptr<int32_t>());
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "relaykern C++ core: paged KV pools and block managers";

  py::register_exception<relaykern::OutOfBlocks>(m, "OutOfBlocks", PyExc_RuntimeError);

  py::class_<KVPool>(m, "KVPool", R"doc(
One model's paged KV cache: a zero-initialised tensor [num_layers, 2, num_blocks, block_size, num_kv_heads,
head_dim] (dim 1: 0 = K, 1 = V). Slot s = block * block_size + offset is row s of
layer(l)[kv].view(-1, num_kv_heads, head_dim). Non-positive sizes raise ValueError.)doc")
      .def(py::init([](int64_t num_layers, int64_t num_blocks, int64_t block_size, int64_t num_kv_heads,
                       int64_t head_dim, at::ScalarType dtype, const py::object& device) {
             return KVPool(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, to_device(device));
           }),
           py::arg("num_layers"), py::arg("num_blocks"), py::arg("block_size"), py::arg("num_kv_heads"),
           py::arg("head_dim"), py::arg("dtype") = at::kBFloat16, py::arg("device") = "cpu")
      .def_static("bytes_per_block", &KVPool::bytes_per_block, py::arg("num_layers"), py::arg("block_size"),
                  py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("dtype") = at::kBFloat16,
                  "Bytes one block id takes over all layers, K and V.")
      .def_static("blocks_for_budget", &KVPool::blocks_for_budget, py::arg("budget_bytes"), py::arg("num_layers"),
                  py::arg("block_size"), py::arg("num_kv_heads"), py::arg("head_dim"),
                  py::arg("dtype") = at::kBFloat16,
                  "floor(budget_bytes / bytes_per_block(...)); ValueError if under one block.")
      .def("layer", &KVPool::layer, py::arg("l"), "View [2, num_blocks, block_size, num_kv_heads, head_dim] of layer l.")
      .def_property_readonly("cache", &KVPool::cache, "The whole cache tensor.")
      .def_property_readonly("num_layers", &KVPool::num_layers)
      .def_property_readonly("num_blocks", &KVPool::num_blocks)
      .def_property_readonly("block_size", &KVPool::block_size)
      .def_property_readonly("num_kv_heads", &KVPool::num_kv_heads)
      .def_property_readonly("head_dim", &KVPool::head_dim)
      .def_property_readonly("dtype", &KVPool::dtype)
      .def_property_readonly("device", &KVPool::device)
      .def_property_readonly("nbytes", &KVPool::nbytes);

  py::class_<BlockManager>(m, "BlockManager", R"doc(
Block tables, ref counts, free list and prefix sharing for one model's KVPool. Position p of a sequence lives in
slot block_table[p // block_size] * block_size + p % block_size. Full blocks are shared by chained hash of their
token ids; a sequence only writes its own partial last block. Unknown/duplicate seq ids and bad ranges raise
ValueError; running out of blocks raises OutOfBlocks and leaves the state unchanged.)doc")
      .def(py::init<int64_t, int64_t, bool>(), py::arg("num_blocks"), py::arg("block_size"),
           py::arg("enable_prefix_caching") = true)
      .def("can_allocate", &BlockManager::can_allocate, py::arg("token_ids"),
           "True if allocate(token_ids) would succeed now (prefix hits on blocks in use need no free block).")
      .def("allocate", &BlockManager::allocate, py::arg("seq_id"), py::arg("token_ids"), R"doc(
Create seq_id holding token_ids. Returns the number of leading tokens whose KV is already cached (a multiple of
block_size, < len(token_ids)). The new full blocks are registered for sharing at once: write their KV in the next
forward.)doc")
      .def("can_append", &BlockManager::can_append, py::arg("seq_id"), py::arg("num_new_tokens"))
      .def("append", &BlockManager::append, py::arg("seq_id"), py::arg("token_ids"),
           "Extend seq_id, taking blocks as needed and registering each block that becomes full.")
      .def("reserve_positions", &BlockManager::reserve_positions, py::arg("seq_id"), py::arg("num_positions"),
           R"doc(
Make seq_id's block table cover its first num_positions positions, taking free blocks, registering nothing (KV
written before the host knows those tokens); append fills them later. False, taking nothing, if blocks are short.)doc")
      .def("free", &BlockManager::free, py::arg("seq_id"), py::arg("keep_cached") = true,
           "Drop seq_id and release its blocks; keep_cached=False also forgets their prefix hashes (KV never "
           "computed).")
      .def("fork", &BlockManager::fork, py::arg("src_seq_id"), py::arg("dst_seq_id"), R"doc(
dst shares src's full blocks and gets a fresh block for src's partial last block. Returns (src_block, dst_block)
to copy on the device, or None when len(src) is a multiple of block_size. num_cached_tokens(dst) = len(src).)doc")
      .def("reset_prefix_cache", &BlockManager::reset_prefix_cache, R"doc(
Forget every prefix hash (new weights make the cached KV stale): later sequences share no block cached so far.
Sequences in flight keep their blocks but register no more of them.)doc")
      .def("has_seq", &BlockManager::has_seq, py::arg("seq_id"))
      .def("block_table", &BlockManager::block_table, py::arg("seq_id"))
      .def("seq_len", &BlockManager::seq_len, py::arg("seq_id"))
      .def("num_cached_tokens", &BlockManager::num_cached_tokens, py::arg("seq_id"),
           "Leading tokens whose KV existed when the sequence was created (prefix hit, or len(src) for a fork).")
      .def("slot_mapping", &BlockManager::slot_mapping, py::arg("seq_id"), py::arg("start"), py::arg("end"),
           "KV slots of positions [start, end).")
      .def("block_tables", &block_tables, py::arg("seq_ids"), py::arg("width"),
           "int32 tensor [len(seq_ids), width] of block tables, padded with -1; ValueError if one is wider.")
      .def("ref_count", &BlockManager::ref_count, py::arg("block_id"))
      .def_property_readonly("num_free_blocks", &BlockManager::num_free_blocks,
                             "Blocks on the free list (including cached ones a prefix hit can revive).")
      .def_property_readonly("num_used_blocks", &BlockManager::num_used_blocks)
      .def_property_readonly("num_seqs", &BlockManager::num_seqs)
      .def_property_readonly("num_blocks", &BlockManager::num_blocks)
      .def_property_readonly("block_size", &BlockManager::block_size)
      .def_property_readonly("prefix_caching", &BlockManager::prefix_caching);
}
