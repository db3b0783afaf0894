#include "block_manager.h"

#include <algorithm>
#include <limits>

namespace relaykern {
namespace {

constexpr uint64_t kChainSeed = 0x243F6A8885A308D3ULL;  // hash "before" the first block

uint64_t mix64(uint64_t x) {  // splitmix64 finaliser: full avalanche
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ULL;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

uint64_t hash_block(uint64_t prefix_hash, const int64_t* tokens, int64_t count) {
  uint64_t h = mix64(prefix_hash);
  for (int64_t i = 0; i < count; ++i) h = mix64(h ^ mix64(static_cast<uint64_t>(tokens[i]) + 0x9E3779B97F4A7C15ULL));
  return h;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

BlockManager::BlockManager(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching)
    : block_size_(block_size), prefix_caching_(enable_prefix_caching) {
  if (num_blocks <= 0 || num_blocks > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("BlockManager: num_blocks must be in [1, 2^31), got " + std::to_string(num_blocks));
  if (block_size <= 0)
    throw std::invalid_argument("BlockManager: block_size must be positive, got " + std::to_string(block_size));
  blocks_.resize(num_blocks);
  prev_.assign(num_blocks, -1);
  next_.assign(num_blocks, -1);
  for (int32_t b = 0; b < static_cast<int32_t>(num_blocks); ++b) free_list_push_back(b);
}

const BlockManager::Seq& BlockManager::seq(int64_t seq_id) const {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw std::invalid_argument("BlockManager: unknown seq_id " + std::to_string(seq_id));
  return it->second;
}

BlockManager::Seq& BlockManager::seq(int64_t seq_id) {
  return const_cast<Seq&>(static_cast<const BlockManager*>(this)->seq(seq_id));
}

std::vector<int32_t> BlockManager::find_cached_blocks(const std::vector<int64_t>& token_ids) const {
  std::vector<int32_t> hits;
  if (!prefix_caching_ || token_ids.empty()) return hits;
  // Full blocks before the one holding the last token: that token must be recomputed to produce logits.
  const int64_t eligible = (static_cast<int64_t>(token_ids.size()) - 1) / block_size_;
  uint64_t h = kChainSeed;
  for (int64_t i = 0; i < eligible; ++i) {
    const int64_t* tokens = token_ids.data() + i * block_size_;
    h = hash_block(h, tokens, block_size_);
    auto it = hash_to_block_.find(h);
    if (it == hash_to_block_.end()) break;
    const Block& block = blocks_[it->second];
    if (!std::equal(block.token_ids.begin(), block.token_ids.end(), tokens)) break;
    hits.push_back(it->second);
  }
  return hits;
}

int64_t BlockManager::blocks_needed(const std::vector<int32_t>& hits, int64_t num_tokens) const {
  // A hit on a block in use costs nothing; a hit on a cached free block still takes it off the free list.
  int64_t shared_in_use = 0;
  for (int32_t b : hits) shared_in_use += blocks_[b].ref_count > 0;
  return ceil_div(num_tokens, block_size_) - shared_in_use;
}

bool BlockManager::can_allocate(const std::vector<int64_t>& token_ids) const {
  if (token_ids.empty()) return false;
  return blocks_needed(find_cached_blocks(token_ids), static_cast<int64_t>(token_ids.size())) <= num_free_;
}

int64_t BlockManager::allocate(int64_t seq_id, const std::vector<int64_t>& token_ids) {
  if (has_seq(seq_id)) throw std::invalid_argument("allocate: seq_id " + std::to_string(seq_id) + " already exists");
  if (token_ids.empty()) throw std::invalid_argument("allocate: token_ids is empty; a sequence needs >= 1 token");
  const int64_t n = static_cast<int64_t>(token_ids.size());
  const std::vector<int32_t> hits = find_cached_blocks(token_ids);
  const int64_t needed = blocks_needed(hits, n);
  if (needed > num_free_)
    throw OutOfBlocks("allocate: seq_id " + std::to_string(seq_id) + " needs " + std::to_string(needed) +
                      " free blocks, " + std::to_string(num_free_) + " left; check can_allocate first");
  Seq s;
  s.chain_hash = kChainSeed;
  for (int32_t b : hits) {
    take_cached_block(b);
    s.table.push_back(b);
    s.chain_hash = blocks_[b].hash;
  }
  s.len = static_cast<int64_t>(hits.size()) * block_size_;
  s.num_cached_tokens = s.len;
  push_tokens(s, token_ids.data() + s.len, n - s.len);
  seqs_.emplace(seq_id, std::move(s));
  return static_cast<int64_t>(hits.size()) * block_size_;
}

bool BlockManager::can_append(int64_t seq_id, int64_t num_new_tokens) const {
  if (num_new_tokens < 0) throw std::invalid_argument("can_append: num_new_tokens must be >= 0");
  const Seq& s = seq(seq_id);
  return ceil_div(s.len + num_new_tokens, block_size_) - static_cast<int64_t>(s.table.size()) <= num_free_;
}

void BlockManager::append(int64_t seq_id, const std::vector<int64_t>& token_ids) {
  const int64_t k = static_cast<int64_t>(token_ids.size());
  if (!can_append(seq_id, k))
    throw OutOfBlocks("append: seq_id " + std::to_string(seq_id) + " cannot take " + std::to_string(k) +
                      " tokens with " + std::to_string(num_free_) + " free blocks; check can_append first");
  push_tokens(seq(seq_id), token_ids.data(), k);
}

bool BlockManager::reserve_positions(int64_t seq_id, int64_t num_positions) {
  Seq& s = seq(seq_id);
  const int64_t missing = ceil_div(num_positions, block_size_) - static_cast<int64_t>(s.table.size());
  if (missing > num_free_) return false;
  for (int64_t i = 0; i < missing; ++i) s.table.push_back(take_free_block());
  return true;
}

void BlockManager::push_tokens(Seq& s, const int64_t* tokens, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    if (s.len == static_cast<int64_t>(s.table.size()) * block_size_) s.table.push_back(take_free_block());
    s.tail.push_back(tokens[i]);
    ++s.len;
    if (s.len % block_size_ == 0) {
      register_full_block(s, s.table[s.len / block_size_ - 1], s.tail.data());
      s.tail.clear();
    }
  }
}

void BlockManager::register_full_block(Seq& s, int32_t block_id, const int64_t* tokens) {
  if (!prefix_caching_ || !s.shares) return;
  Block& block = blocks_[block_id];
  s.chain_hash = hash_block(s.chain_hash, tokens, block_size_);
  block.hashed = true;
  block.hash = s.chain_hash;
  block.token_ids.assign(tokens, tokens + block_size_);
  hash_to_block_[block.hash] = block_id;  // the newest copy wins; older copies keep their hash for their chains
}

void BlockManager::free(int64_t seq_id, bool keep_cached) {
  const Seq& s = seq(seq_id);
  for (auto it = s.table.rbegin(); it != s.table.rend(); ++it) release_block(*it, keep_cached);
  seqs_.erase(seq_id);
}

std::optional<std::pair<int32_t, int32_t>> BlockManager::fork(int64_t src_seq_id, int64_t dst_seq_id) {
  const Seq& src = seq(src_seq_id);
  if (has_seq(dst_seq_id)) throw std::invalid_argument("fork: dst seq_id " + std::to_string(dst_seq_id) + " exists");
  const bool partial = src.len % block_size_ != 0;
  if (partial && num_free_ == 0) throw OutOfBlocks("fork: no free block for the copy of the partial last block");
  Seq dst = src;
  dst.table.resize(ceil_div(src.len, block_size_));
  dst.num_cached_tokens = src.len;
  std::optional<std::pair<int32_t, int32_t>> copy;
  if (partial) dst.table.pop_back();
  for (int32_t b : dst.table) ++blocks_[b].ref_count;
  if (partial) {
    const int32_t fresh = take_free_block();
    dst.table.push_back(fresh);
    copy = std::make_pair(src.table.back(), fresh);
  }
  seqs_.emplace(dst_seq_id, std::move(dst));
  return copy;
}

void BlockManager::reset_prefix_cache() {
  hash_to_block_.clear();
  for (Block& block : blocks_) {
    block.hashed = false;
    block.token_ids.clear();
  }
  for (auto& [seq_id, s] : seqs_) s.shares = false;
}

std::vector<int64_t> BlockManager::slot_mapping(int64_t seq_id, int64_t start, int64_t end) const {
  const Seq& s = seq(seq_id);
  if (start < 0 || start > end || end > s.len)
    throw std::invalid_argument("slot_mapping: need 0 <= start <= end <= seq_len (" + std::to_string(s.len) +
                                "), got [" + std::to_string(start) + ", " + std::to_string(end) + ")");
  std::vector<int64_t> slots;
  slots.reserve(end - start);
  for (int64_t p = start; p < end; ++p) slots.push_back(s.table[p / block_size_] * block_size_ + p % block_size_);
  return slots;
}

void BlockManager::write_block_tables(const std::vector<int64_t>& seq_ids, int64_t width, int32_t* out) const {
  for (size_t r = 0; r < seq_ids.size(); ++r) {
    const std::vector<int32_t>& table = seq(seq_ids[r]).table;
    if (static_cast<int64_t>(table.size()) > width)
      throw std::invalid_argument("block_tables: seq_id " + std::to_string(seq_ids[r]) + " has " +
                                  std::to_string(table.size()) + " blocks > width " + std::to_string(width));
    int32_t* row = out + r * width;
    std::copy(table.begin(), table.end(), row);
    std::fill(row + table.size(), row + width, -1);
  }
}

int32_t BlockManager::ref_count(int64_t block_id) const {
  if (block_id < 0 || block_id >= num_blocks())
    throw std::invalid_argument("ref_count: block_id " + std::to_string(block_id) + " out of range");
  return blocks_[block_id].ref_count;
}

int32_t BlockManager::take_free_block() {
  const int32_t b = head_;
  free_list_remove(b);
  Block& block = blocks_[b];
  auto it = block.hashed ? hash_to_block_.find(block.hash) : hash_to_block_.end();
  if (it != hash_to_block_.end() && it->second == b) hash_to_block_.erase(it);
  block.hashed = false;
  block.token_ids.clear();
  block.ref_count = 1;
  return b;
}

void BlockManager::take_cached_block(int32_t block_id) {
  if (blocks_[block_id].ref_count++ == 0) free_list_remove(block_id);
}

void BlockManager::release_block(int32_t block_id, bool keep_cached) {
  Block& block = blocks_[block_id];
  if (--block.ref_count != 0) return;
  if (!keep_cached && block.hashed) {
    auto it = hash_to_block_.find(block.hash);
    if (it != hash_to_block_.end() && it->second == block_id) hash_to_block_.erase(it);
    block.hashed = false;
    block.token_ids.clear();
  }
  free_list_push_back(block_id);
}

void BlockManager::free_list_push_back(int32_t b) {
  prev_[b] = tail_;
  next_[b] = -1;
  (tail_ == -1 ? head_ : next_[tail_]) = b;
  tail_ = b;
  ++num_free_;
}

void BlockManager::free_list_remove(int32_t b) {
  (prev_[b] == -1 ? head_ : next_[prev_[b]]) = next_[b];
  (next_[b] == -1 ? tail_ : prev_[next_[b]]) = prev_[b];
  prev_[b] = next_[b] = -1;
  --num_free_;
}

}  // namespace relaykern
