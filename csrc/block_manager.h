// Paged-KV block bookkeeping for one model: per-sequence block tables, reference counts, a free list and prefix
// sharing of full blocks by chained hash (the shape of nano-vllm's block_manager.py). Torch-free C++17.
//
// Index math: token position p of a sequence lives in block table[p / block_size] at offset p % block_size, i.e.
// KV slot table[p / block_size] * block_size + p % block_size of the model's KVPool.
//
// Sharing rule: only FULL blocks are shared, so a sequence only ever writes into its own partial last block.
// A full block's hash is hash(hash of the previous block, its block_size token ids); the first block chains from a
// fixed seed. A lookup hit also compares the block's stored token ids, so a hit needs a 64-bit collision of the
// prefix chain to be wrong. Freed blocks keep their hash (and stay reusable) until they are handed out again.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace relaykern {

// Raised when the free list cannot satisfy a request; the manager's state is left unchanged.
class OutOfBlocks : public std::runtime_error {
 public:
  explicit OutOfBlocks(const std::string& what) : std::runtime_error(what) {}
};

class BlockManager {
 public:
  BlockManager(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching = true);

  // True if allocate(token_ids) would succeed now (prefix hits on blocks in use need no free block).
  bool can_allocate(const std::vector<int64_t>& token_ids) const;
  // Creates seq_id holding token_ids; returns how many leading tokens already have KV in the cache (a multiple of
  // block_size, always < token_ids.size() so the last token is recomputed). Registers the hashes of the new full
  // blocks at once, so the caller must write their KV no later than the forward of any sequence that shares them.
  int64_t allocate(int64_t seq_id, const std::vector<int64_t>& token_ids);
  bool can_append(int64_t seq_id, int64_t num_new_tokens) const;
  // Extends seq_id, taking blocks as needed and registering the hash of each block that becomes full.
  void append(int64_t seq_id, const std::vector<int64_t>& token_ids);
  // Makes seq_id's block table cover its first num_positions token positions, taking free blocks but registering
  // nothing: a forward may then write KV at positions whose token ids the host learns only afterwards (the relay's
  // overlapped steps), and append fills those blocks later without taking new ones. Returns false, taking nothing,
  // when the free blocks do not suffice.
  bool reserve_positions(int64_t seq_id, int64_t num_positions);
  // Drops seq_id; blocks whose ref count reaches 0 go back to the free list (last block first, so a prompt's
  // earlier blocks, the likelier to be shared, stay cached longest).
  // keep_cached=false forgets the hashes of the blocks this frees: for a sequence whose KV was never computed
  // (a failed forward), so no later request can hit on garbage.
  void free(int64_t seq_id, bool keep_cached = true);
  // dst shares src's full blocks and gets a fresh block for src's partial last block; returns (src_block,
  // dst_block) for the caller to copy on the device, or nullopt when src's length is a multiple of block_size.
  // Blocks src reserved past its length (reserve_positions) stay src's alone.
  // dst's num_cached_tokens is src's length: fork after src's KV is written.
  std::optional<std::pair<int32_t, int32_t>> fork(int64_t src_seq_id, int64_t dst_seq_id);
  // Forgets every prefix hash, for new weights: no later sequence shares a block whose KV exists now. Sequences in
  // flight keep their blocks (and KV) but register no more, since their blocks mix KV of both weights.
  void reset_prefix_cache();

  bool has_seq(int64_t seq_id) const { return seqs_.count(seq_id) != 0; }
  const std::vector<int32_t>& block_table(int64_t seq_id) const { return seq(seq_id).table; }
  int64_t seq_len(int64_t seq_id) const { return seq(seq_id).len; }
  int64_t num_cached_tokens(int64_t seq_id) const { return seq(seq_id).num_cached_tokens; }
  // KV slots of positions [start, end): table[p / block_size] * block_size + p % block_size.
  std::vector<int64_t> slot_mapping(int64_t seq_id, int64_t start, int64_t end) const;
  // Writes the tables of seq_ids as rows of a row-major [seq_ids.size(), width] int32 array, padded with -1.
  void write_block_tables(const std::vector<int64_t>& seq_ids, int64_t width, int32_t* out) const;
  int32_t ref_count(int64_t block_id) const;

  int64_t num_blocks() const { return static_cast<int64_t>(blocks_.size()); }
  int64_t block_size() const { return block_size_; }
  int64_t num_free_blocks() const { return num_free_; }
  int64_t num_used_blocks() const { return num_blocks() - num_free_; }
  int64_t num_seqs() const { return static_cast<int64_t>(seqs_.size()); }
  bool prefix_caching() const { return prefix_caching_; }

 private:
  struct Block {
    int32_t ref_count = 0;
    bool hashed = false;
    uint64_t hash = 0;
    std::vector<int64_t> token_ids;  // kept only for hashed blocks, to verify hits
  };
  struct Seq {
    std::vector<int32_t> table;
    int64_t len = 0;
    int64_t num_cached_tokens = 0;
    uint64_t chain_hash = 0;     // hash of the last full block (the seed when there is none)
    std::vector<int64_t> tail;   // tokens of the partial last block, needed to hash it once it is full
    bool shares = true;          // registers its full blocks (false once a reset_prefix_cache saw it in flight)
  };

  const Seq& seq(int64_t seq_id) const;
  Seq& seq(int64_t seq_id);
  // Prefix-cache hits for token_ids: the leading run of blocks (never the last one) whose hash and tokens match.
  std::vector<int32_t> find_cached_blocks(const std::vector<int64_t>& token_ids) const;
  int64_t blocks_needed(const std::vector<int32_t>& hits, int64_t num_tokens) const;
  int32_t take_free_block();
  void take_cached_block(int32_t block_id);
  void release_block(int32_t block_id, bool keep_cached);
  void register_full_block(Seq& s, int32_t block_id, const int64_t* tokens);
  void push_tokens(Seq& s, const int64_t* tokens, int64_t count);

  // Free list: an intrusive doubly linked list over block ids, so a cached free block can leave it in O(1).
  void free_list_push_back(int32_t block_id);
  void free_list_remove(int32_t block_id);

  int64_t block_size_;
  bool prefix_caching_;
  std::vector<Block> blocks_;
  std::vector<int32_t> prev_, next_;
  int32_t head_ = -1, tail_ = -1;
  int64_t num_free_ = 0;
  std::unordered_map<uint64_t, int32_t> hash_to_block_;
  std::unordered_map<int64_t, Seq> seqs_;
};

}  // namespace relaykern
