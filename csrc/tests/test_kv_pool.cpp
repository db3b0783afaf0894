#include <stdexcept>

#include "check.h"
#include "kv_pool.h"

using relaykern::KVPool;

int main() {
  KVPool pool(3, 5, 4, 2, 8, c10::kBFloat16, c10::Device(c10::kCPU));
  REQUIRE((pool.cache().sizes() == at::IntArrayRef{3, 2, 5, 4, 2, 8}));
  REQUIRE_EQ(pool.cache().count_nonzero().item<int64_t>(), 0);
  at::Tensor layer = pool.layer(1);
  REQUIRE((layer.sizes() == at::IntArrayRef{2, 5, 4, 2, 8}));
  layer.fill_(1);  // a view: writes land in the pool
  REQUIRE_EQ(pool.cache().select(0, 1).count_nonzero().item<int64_t>(), layer.numel());
  REQUIRE_EQ(pool.cache().select(0, 0).count_nonzero().item<int64_t>(), 0);
  REQUIRE_THROWS(pool.layer(3), std::invalid_argument);

  const int64_t per_block = KVPool::bytes_per_block(3, 4, 2, 8, c10::kBFloat16);
  REQUIRE_EQ(per_block, 3 * 2 * 4 * 2 * 8 * 2);
  REQUIRE_EQ(pool.nbytes(), 5 * per_block);
  REQUIRE_EQ(KVPool::blocks_for_budget(7 * per_block + 1, 3, 4, 2, 8, c10::kBFloat16), 7);
  REQUIRE_THROWS(KVPool::blocks_for_budget(per_block - 1, 3, 4, 2, 8, c10::kBFloat16), std::invalid_argument);
  REQUIRE_THROWS(KVPool(0, 5, 4, 2, 8, c10::kFloat, c10::Device(c10::kCPU)), std::invalid_argument);
  REQUIRE_THROWS(KVPool(3, 5, 4, 2, -1, c10::kFloat, c10::Device(c10::kCPU)), std::invalid_argument);
  std::printf("test_kv_pool: ok\n");
  return 0;
}
