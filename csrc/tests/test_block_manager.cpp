#include <map>
#include <numeric>
#include <random>
#include <vector>

#include "block_manager.h"
#include "check.h"

using relaykern::BlockManager;
using relaykern::OutOfBlocks;

namespace {

std::vector<int64_t> iota(int64_t n, int64_t start = 0) {
  std::vector<int64_t> v(n);
  std::iota(v.begin(), v.end(), start);
  return v;
}

// Sum of ref counts equals the number of table entries of live sequences, and used blocks are exactly those with
// a positive ref count.
void check_invariants(const BlockManager& bm, const std::vector<int64_t>& live) {
  std::map<int32_t, int32_t> refs;
  for (int64_t id : live)
    for (int32_t b : bm.block_table(id)) ++refs[b];
  int64_t used = 0;
  for (int64_t b = 0; b < bm.num_blocks(); ++b) {
    auto it = refs.find(static_cast<int32_t>(b));
    REQUIRE_EQ(bm.ref_count(b), it == refs.end() ? 0 : it->second);
    used += bm.ref_count(b) > 0;
  }
  REQUIRE_EQ(bm.num_used_blocks(), used);
  REQUIRE_EQ(bm.num_seqs(), static_cast<int64_t>(live.size()));
}

void test_allocate_append_free() {
  BlockManager bm(8, 4);
  REQUIRE_EQ(bm.allocate(1, iota(5)), 0);
  REQUIRE_EQ(bm.block_table(1).size(), 2u);
  REQUIRE_EQ(bm.seq_len(1), 5);
  bm.append(1, iota(4, 5));  // 9 tokens: crosses into a third block
  REQUIRE_EQ(bm.block_table(1).size(), 3u);
  std::vector<int64_t> slots = bm.slot_mapping(1, 3, 9);
  const auto& t = bm.block_table(1);
  REQUIRE_EQ(slots[0], t[0] * 4 + 3);
  REQUIRE_EQ(slots[1], t[1] * 4 + 0);
  REQUIRE_EQ(slots[5], t[2] * 4 + 0);
  REQUIRE_THROWS(bm.allocate(1, iota(3)), std::invalid_argument);
  REQUIRE_THROWS(bm.allocate(2, {}), std::invalid_argument);
  REQUIRE_THROWS(bm.slot_mapping(1, 0, 10), std::invalid_argument);
  bm.free(1);
  REQUIRE_EQ(bm.num_free_blocks(), 8);
  REQUIRE_THROWS(bm.free(1), std::invalid_argument);
}

void test_prefix_sharing() {
  BlockManager bm(16, 4);
  std::vector<int64_t> a = iota(10), b = iota(10);  // common 2.5-block prefix
  b.push_back(100);
  a.push_back(200);
  REQUIRE_EQ(bm.allocate(1, a), 0);
  REQUIRE_EQ(bm.allocate(2, b), 8);
  REQUIRE_EQ(bm.num_cached_tokens(2), 8);
  REQUIRE_EQ(bm.block_table(1)[0], bm.block_table(2)[0]);
  REQUIRE_EQ(bm.block_table(1)[1], bm.block_table(2)[1]);
  REQUIRE(bm.block_table(1)[2] != bm.block_table(2)[2]);
  REQUIRE_EQ(bm.num_used_blocks(), 4);
  check_invariants(bm, {1, 2});
  // Freed blocks stay cached: a third request revives them without computing.
  bm.free(1);
  bm.free(2);
  REQUIRE_EQ(bm.num_free_blocks(), 16);
  REQUIRE_EQ(bm.allocate(3, a), 8);
  // An exact multiple of block_size never reuses its last block: the last token is recomputed.
  REQUIRE_EQ(bm.allocate(4, iota(8)), 4);
  check_invariants(bm, {3, 4});
  bm.free(3);
  bm.free(4);
  REQUIRE_EQ(bm.num_free_blocks(), 16);
}

void test_reset_prefix_cache() {
  BlockManager bm(16, 4);
  REQUIRE_EQ(bm.allocate(1, iota(9)), 0);
  bm.free(1);
  REQUIRE_EQ(bm.allocate(2, iota(6, 100)), 0);  // in flight through the reset: one full block, one partial
  bm.reset_prefix_cache();
  REQUIRE_EQ(bm.allocate(3, iota(9)), 0);  // nothing cached before the reset is shared after it
  bm.append(2, iota(6, 106));              // 2 completes its second block: mixed KV, not registered
  REQUIRE_EQ(bm.allocate(4, iota(13, 100)), 0);
  REQUIRE_EQ(bm.allocate(5, iota(13)), 8);  // blocks registered after the reset are shared
  REQUIRE_EQ(bm.block_table(5)[0], bm.block_table(3)[0]);
  check_invariants(bm, {2, 3, 4, 5});
}

void test_no_prefix_caching() {
  BlockManager bm(8, 4, false);
  REQUIRE_EQ(bm.allocate(1, iota(9)), 0);
  REQUIRE_EQ(bm.allocate(2, iota(9)), 0);
  REQUIRE_EQ(bm.num_used_blocks(), 6);
}

void test_fork() {
  BlockManager bm(8, 4);
  bm.allocate(1, iota(6));
  auto copy = bm.fork(1, 2);
  REQUIRE(copy.has_value());
  REQUIRE_EQ(copy->first, bm.block_table(1)[1]);
  REQUIRE_EQ(copy->second, bm.block_table(2)[1]);
  REQUIRE_EQ(bm.block_table(1)[0], bm.block_table(2)[0]);
  REQUIRE_EQ(bm.num_cached_tokens(2), 6);
  bm.append(2, {7, 8, 9});
  REQUIRE_EQ(bm.seq_len(2), 9);
  bm.allocate(3, iota(8));
  REQUIRE(!bm.fork(3, 4).has_value());
  check_invariants(bm, {1, 2, 3, 4});
  for (int64_t id : {1, 2, 3, 4}) bm.free(id);
  REQUIRE_EQ(bm.num_free_blocks(), 8);
}

void test_out_of_blocks_leaves_state() {
  BlockManager bm(3, 4);
  bm.allocate(1, iota(9));
  REQUIRE(!bm.can_allocate(iota(5, 50)));
  REQUIRE_THROWS(bm.allocate(2, iota(5, 50)), OutOfBlocks);
  REQUIRE(!bm.has_seq(2));
  REQUIRE(!bm.can_append(1, 4));
  REQUIRE_THROWS(bm.append(1, iota(4)), OutOfBlocks);
  REQUIRE_EQ(bm.seq_len(1), 9);
  REQUIRE_THROWS(bm.fork(1, 3), OutOfBlocks);
  REQUIRE(!bm.has_seq(3));
  REQUIRE_EQ(bm.num_free_blocks(), 0);
  check_invariants(bm, {1});
  bm.free(1);
  REQUIRE_EQ(bm.num_free_blocks(), 3);
}

void test_block_tables() {
  BlockManager bm(8, 2);
  bm.allocate(1, iota(5));
  bm.allocate(2, iota(1, 100));
  std::vector<int32_t> out(2 * 4);
  bm.write_block_tables({1, 2}, 4, out.data());
  REQUIRE_EQ(out[0], bm.block_table(1)[0]);
  REQUIRE_EQ(out[3], -1);
  REQUIRE_EQ(out[4], bm.block_table(2)[0]);
  REQUIRE_EQ(out[5], -1);
  REQUIRE_THROWS(bm.write_block_tables({1}, 2, out.data()), std::invalid_argument);
}

void test_random_ops() {
  std::mt19937_64 rng(0);
  BlockManager bm(24, 4);
  std::vector<int64_t> live;
  int64_t next_id = 0;
  for (int step = 0; step < 5000; ++step) {
    const int op = static_cast<int>(rng() % 4);
    if (op == 0 || live.empty()) {  // prompts from a tiny vocabulary so prefixes repeat
      std::vector<int64_t> tokens(1 + rng() % 14);
      for (auto& t : tokens) t = static_cast<int64_t>(rng() % 2);
      if (bm.can_allocate(tokens)) {
        int64_t cached = bm.allocate(next_id, tokens);
        REQUIRE(cached % 4 == 0 && cached < static_cast<int64_t>(tokens.size()));
        live.push_back(next_id);
      } else {
        REQUIRE_THROWS(bm.allocate(next_id, tokens), OutOfBlocks);
      }
      ++next_id;
    } else if (op == 1) {
      int64_t id = live[rng() % live.size()];
      std::vector<int64_t> tokens(1 + rng() % 6, static_cast<int64_t>(rng() % 2));
      if (bm.can_append(id, static_cast<int64_t>(tokens.size()))) bm.append(id, tokens);
      else REQUIRE_THROWS(bm.append(id, tokens), OutOfBlocks);
    } else if (op == 2) {
      size_t i = rng() % live.size();
      bm.free(live[i]);
      live.erase(live.begin() + static_cast<std::ptrdiff_t>(i));
    } else {
      int64_t id = live[rng() % live.size()];
      try {
        bm.fork(id, next_id);
        live.push_back(next_id);
      } catch (const OutOfBlocks&) {
        REQUIRE_EQ(bm.num_free_blocks(), 0);
      }
      ++next_id;
    }
    check_invariants(bm, live);
  }
  for (int64_t id : live) bm.free(id);
  REQUIRE_EQ(bm.num_free_blocks(), 24);
}

// Reserved positions: covered by the table before their tokens are known; append fills them without new blocks,
// can_append counts them, free returns them, and a fork does not share them.
void test_reserve_positions() {
  BlockManager bm(4, 4);
  bm.allocate(1, iota(4));
  REQUIRE(bm.reserve_positions(1, 6));
  REQUIRE_EQ(bm.block_table(1).size(), 2u);
  REQUIRE_EQ(bm.seq_len(1), 4);
  REQUIRE_EQ(bm.num_free_blocks(), 2);
  REQUIRE(bm.reserve_positions(1, 8));  // already covered
  REQUIRE_EQ(bm.num_free_blocks(), 2);
  REQUIRE(!bm.reserve_positions(1, 20));
  REQUIRE_EQ(bm.block_table(1).size(), 2u);
  bm.fork(1, 2);
  REQUIRE_EQ(bm.block_table(2).size(), 1u);
  REQUIRE(bm.can_append(1, 4));
  const int32_t reserved = bm.block_table(1)[1];
  bm.append(1, iota(4, 4));
  REQUIRE_EQ(bm.block_table(1).size(), 2u);
  REQUIRE_EQ(bm.block_table(1)[1], reserved);
  REQUIRE_EQ(bm.num_free_blocks(), 2);
  bm.allocate(3, iota(8));  // a prefix hit on the first block (never on the last)
  REQUIRE_EQ(bm.num_cached_tokens(3), 4);
  check_invariants(bm, {1, 2, 3});
  for (int64_t id : {1, 2, 3}) bm.free(id);
  REQUIRE_EQ(bm.num_free_blocks(), 4);
  // A block filled while a later one is reserved is the one registered: a prompt of both blocks hits it.
  bm.allocate(4, iota(2));
  REQUIRE(bm.reserve_positions(4, 12));
  bm.append(4, iota(6, 2));
  REQUIRE_EQ(bm.block_table(4).size(), 3u);
  bm.allocate(5, iota(9));
  REQUIRE_EQ(bm.num_cached_tokens(5), 8);
  REQUIRE_EQ(bm.block_table(5)[1], bm.block_table(4)[1]);
  bm.free(4);
  bm.free(5);
  REQUIRE_EQ(bm.num_free_blocks(), 4);
}

}  // namespace

int main() {
  test_allocate_append_free();
  test_prefix_sharing();
  test_no_prefix_caching();
  test_reset_prefix_cache();
  test_fork();
  test_reserve_positions();
  test_out_of_blocks_leaves_state();
  test_block_tables();
  test_random_ops();
  std::printf("test_block_manager: ok\n");
  return 0;
}
