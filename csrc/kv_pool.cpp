#include "kv_pool.h"

#include <ATen/ops/zeros.h>

#include <stdexcept>
#include <string>

namespace relaykern {
namespace {

void check_positive(int64_t value, const char* name) {
  if (value <= 0) throw std::invalid_argument(std::string("KVPool: ") + name + " must be positive, got " +
                                              std::to_string(value));
}

}  // namespace

KVPool::KVPool(int64_t num_layers, int64_t num_blocks, int64_t block_size, int64_t num_kv_heads, int64_t head_dim,
               c10::ScalarType dtype, c10::Device device) {
  check_positive(num_blocks, "num_blocks");
  bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype);  // validates the other sizes
  cache_ = at::zeros({num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim},
                     at::TensorOptions().dtype(dtype).device(device));
}

int64_t KVPool::bytes_per_block(int64_t num_layers, int64_t block_size, int64_t num_kv_heads, int64_t head_dim,
                                c10::ScalarType dtype) {
  check_positive(num_layers, "num_layers");
  check_positive(block_size, "block_size");
  check_positive(num_kv_heads, "num_kv_heads");
  check_positive(head_dim, "head_dim");
  return num_layers * 2 * block_size * num_kv_heads * head_dim * static_cast<int64_t>(c10::elementSize(dtype));
}

int64_t KVPool::blocks_for_budget(int64_t budget_bytes, int64_t num_layers, int64_t block_size,
                                  int64_t num_kv_heads, int64_t head_dim, c10::ScalarType dtype) {
  const int64_t per_block = bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype);
  if (budget_bytes < per_block)
    throw std::invalid_argument("KVPool: budget of " + std::to_string(budget_bytes) + " bytes is less than one block (" +
                                std::to_string(per_block) + " bytes); give the KV cache more memory");
  return budget_bytes / per_block;
}

at::Tensor KVPool::layer(int64_t l) const {
  if (l < 0 || l >= num_layers())
    throw std::invalid_argument("KVPool: layer " + std::to_string(l) + " out of range [0, " +
                                std::to_string(num_layers()) + ")");
  return cache_.select(0, l);
}

}  // namespace relaykern
