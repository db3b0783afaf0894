// One model's paged KV cache as a single tensor [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
// (index 0 of dim 1 is K, 1 is V). A block id names the same block in every layer, so token slot
// s = block * block_size + offset addresses cache[l, kv].view(-1, num_kv_heads, head_dim)[s] in each layer l.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>

namespace relaykern {

class KVPool {
 public:
  KVPool(int64_t num_layers, int64_t num_blocks, int64_t block_size, int64_t num_kv_heads, int64_t head_dim,
         c10::ScalarType dtype, c10::Device device);

  // Bytes one block id takes across all layers, K and V: num_layers * 2 * block_size * num_kv_heads * head_dim *
  // element size.
  static int64_t bytes_per_block(int64_t num_layers, int64_t block_size, int64_t num_kv_heads, int64_t head_dim,
                                 c10::ScalarType dtype);
  // floor(budget_bytes / bytes_per_block); throws std::invalid_argument if that is less than one block.
  static int64_t blocks_for_budget(int64_t budget_bytes, int64_t num_layers, int64_t block_size,
                                   int64_t num_kv_heads, int64_t head_dim, c10::ScalarType dtype);

  const at::Tensor& cache() const { return cache_; }
  // View [2, num_blocks, block_size, num_kv_heads, head_dim] of layer l (shares storage with cache()).
  at::Tensor layer(int64_t l) const;

  int64_t num_layers() const { return cache_.size(0); }
  int64_t num_blocks() const { return cache_.size(2); }
  int64_t block_size() const { return cache_.size(3); }
  int64_t num_kv_heads() const { return cache_.size(4); }
  int64_t head_dim() const { return cache_.size(5); }
  c10::ScalarType dtype() const { return cache_.scalar_type(); }
  c10::Device device() const { return cache_.device(); }
  int64_t nbytes() const { return static_cast<int64_t>(cache_.nbytes()); }

 private:
  at::Tensor cache_;
};

}  // namespace relaykern
