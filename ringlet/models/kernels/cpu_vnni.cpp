// Weight-only int8 and int4 products of few rows of x on x86 CPUs with AVX-512 VNNI, built at run time by
// cpu_vnni.py (-march=native). x is rounded to int8 per block of 32 values (a float step a block), as llama.cpp's q8
// dot products round it, and 64 products are summed an instruction (`vpdpbusd`, unsigned bytes times signed ones).
//
// int8 [N, K], a step a row: |x| is the unsigned operand and x's sign moves onto the codes, so a code of -128
// (which does not negate) is refused by the caller.
//
// int4 [N, K] in tiles of 16 output rows: per tile, per 8 columns (an octet), 64 bytes, 4 a row; byte j of a row
// holds the code of column j in its low nibble and of column j + 4 in its high one. An int32 lane is one row, so the
// 16 lanes of a `vpdpbusd` are the tile's rows, each summing 4 columns against x's 4 (broadcast): no horizontal
// sums. Scales and zeros as Int4Linear keeps them for PyTorch's kernel: bf16 pairs [K / group, N, 2], the weight
// being (code - 8) * scale + zero, so x . w = sum_groups scale * (x . code) + (zero - 8 scale) * sum(x).
//
// int5: the same tiles hold the low 4 bits of 5-bit codes (0..31); per tile, per octet, 16 more bytes hold the fifth
// bits: two 64-bit masks, bit b of the first for byte b of the octet's low-nibble vector, of the second for its
// high-nibble one. A mask adds 16 to the codes it marks before the product.
//
// int8 in tiles of 16 rows: per tile, per 4 columns, 64 bytes, 4 a row, each code + 128 (so unsigned); x . w =
// scale * sum_blocks step * (x_codes . (w + 128) - 128 sum(x_codes)), exact in int32 before the step.
//
// decode_attention: one query a sequence over its keys and values where they lie in a paged cache.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int kBlock = 32;

inline float as_float(float v) { return v; }
inline float as_float(at::BFloat16 v) { return static_cast<float>(v); }

// One row of x rounded per block: its codes in column order, a step a block, and the sum of the unrounded x per group.
struct RoundedRow {
  std::vector<int8_t> codes;
  std::vector<float> step;
  std::vector<float> group_sums;
  std::vector<int32_t> code_sums;  // of each block's codes
};

template <typename T>
RoundedRow round_row(const T* row, int64_t k, int64_t group) {
  std::vector<float> converted(k);
  for (int64_t i = 0; i < k; ++i) converted[i] = as_float(row[i]);
  const float* x = converted.data();
  RoundedRow out;
  out.codes.resize(k);
  out.step.resize(k / kBlock);
  out.group_sums.assign(k / group, 0.0f);
  out.code_sums.assign(k / kBlock, 0);
  for (int64_t b = 0; b < k / kBlock; ++b) {
    const float* v = x + b * kBlock;
    float amax = 0.0f, sum = 0.0f;
    for (int i = 0; i < kBlock; ++i) {
      amax = std::max(amax, std::fabs(v[i]));
      sum += v[i];
    }
    const float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (int i = 0; i < kBlock; ++i) {
      out.codes[b * kBlock + i] = static_cast<int8_t>(std::nearbyint(v[i] * inverse));
      out.code_sums[b] += out.codes[b * kBlock + i];
    }
    out.step[b] = amax / 127.0f;
    out.group_sums[b * kBlock / group] += sum;
  }
  return out;
}

// A rounded row as the int8 product takes it: |code|, a bit a value where the code is negative, and each block's
// step repeated for the 8 int32 lanes that sum the block.
struct SignedRow {
  std::vector<uint8_t> magnitude;
  std::vector<uint64_t> negative;
  std::vector<float> step8;
};

SignedRow split_signs(const RoundedRow& x, int64_t k) {
  SignedRow out;
  out.magnitude.resize(k);
  out.negative.assign((k + 63) / 64, 0);
  out.step8.resize(k / kBlock * 8);
  for (int64_t at = 0; at < k; ++at) {
    out.magnitude[at] = static_cast<uint8_t>(std::abs(static_cast<int>(x.codes[at])));
    if (x.codes[at] < 0) out.negative[at / 64] |= uint64_t{1} << (at % 64);
  }
  for (int64_t b = 0; b < k / kBlock; ++b)
    for (int i = 0; i < 8; ++i) out.step8[b * 8 + i] = x.step[b];
  return out;
}

float int8_dot(const int8_t* codes, const SignedRow& x, int64_t k) {
  const uint8_t* magnitude = x.magnitude.data();
  const float* step8 = x.step8.data();
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c * 64 < k; ++c) {
    const int64_t left = k - c * 64;  // a multiple of 32
    const __mmask64 bytes = left >= 64 ? ~__mmask64{0} : (__mmask64{1} << left) - 1;
    const __mmask16 lanes = left >= 64 ? 0xFFFF : 0x00FF;
    const __m512i w = _mm512_maskz_loadu_epi8(bytes, codes + c * 64);
    const __m512i signed_w = _mm512_mask_sub_epi8(w, x.negative[c], _mm512_setzero_si512(), w);
    const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_maskz_loadu_epi8(bytes, magnitude + c * 64),
                                            signed_w);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_maskz_loadu_ps(lanes, step8 + c * 16), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

inline int32_t four_codes(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// 16 floats stored as they are, or rounded to bf16 (to nearest, ties to even).
inline void store16(float* out, __m512 v) { _mm512_storeu_ps(out, v); }
inline void store16(at::BFloat16* out, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}

// out[i][16 rows] = x_i . w for kRows rows of x and one tile of 16 rows of W: each word of codes unpacked once. With
// `high` (the tile's fifth bits), the codes are 5-bit.
template <int kRows, bool kFive, typename Out>
void int4_tile(const uint8_t* tile, const uint8_t* high, const uint32_t* scale_zero, const RoundedRow* x, int64_t k,
               int64_t group, int64_t n, Out* out, int64_t out_stride) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m512i sixteen = _mm512_set1_epi8(16);
  const __m512i high_half = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  __m512 acc[kRows];
  for (int i = 0; i < kRows; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t blocks_a_group = group / kBlock;
  for (int64_t g = 0; g < k / group; ++g) {
    __m512 grouped[kRows];
    for (int i = 0; i < kRows; ++i) grouped[i] = _mm512_setzero_ps();
    for (int64_t b = g * blocks_a_group; b < (g + 1) * blocks_a_group; ++b) {
      __m512i dot[kRows];
      for (int i = 0; i < kRows; ++i) dot[i] = _mm512_setzero_si512();
      for (int o = 0; o < kBlock / 8; ++o) {
        const int64_t column = b * kBlock + o * 8;
        const __m512i w = _mm512_loadu_si512(tile + column * 8);
        __m512i lo = _mm512_and_si512(w, low);
        __m512i hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
        if constexpr (kFive) {
          uint64_t marks[2];
          std::memcpy(marks, high + column * 2, sizeof(marks));
          lo = _mm512_mask_add_epi8(lo, _cvtu64_mask64(marks[0]), lo, sixteen);
          hi = _mm512_mask_add_epi8(hi, _cvtu64_mask64(marks[1]), hi, sixteen);
        }
        for (int i = 0; i < kRows; ++i) {
          const int8_t* xc = x[i].codes.data() + column;
          dot[i] = _mm512_dpbusd_epi32(dot[i], lo, _mm512_set1_epi32(four_codes(xc)));
          dot[i] = _mm512_dpbusd_epi32(dot[i], hi, _mm512_set1_epi32(four_codes(xc + 4)));
        }
      }
      for (int i = 0; i < kRows; ++i)
        grouped[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i]), _mm512_set1_ps(x[i].step[b]), grouped[i]);
    }
    const __m512i pairs = _mm512_loadu_si512(scale_zero + g * n);
    const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
    const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pairs, high_half));
    const __m512 offset = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), scale, zero);
    for (int i = 0; i < kRows; ++i) {
      acc[i] = _mm512_fmadd_ps(grouped[i], scale, acc[i]);
      acc[i] = _mm512_fmadd_ps(offset, _mm512_set1_ps(x[i].group_sums[g]), acc[i]);
    }
  }
  for (int i = 0; i < kRows; ++i) store16(out + i * out_stride, acc[i]);
}

// out[i][16 rows] = x_i . w for kRows rows of x and one int8 tile of 16 rows.
template <int kRows, typename Out>
void int8_tile(const uint8_t* tile, const float* scales, const RoundedRow* x, int64_t k, Out* out, int64_t out_stride) {
  __m512 acc[kRows];
  for (int i = 0; i < kRows; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < k / kBlock; ++b) {
    __m512i dot[kRows];
    for (int i = 0; i < kRows; ++i) dot[i] = _mm512_set1_epi32(-128 * x[i].code_sums[b]);
    for (int o = 0; o < kBlock / 4; ++o) {
      const int64_t column = b * kBlock + o * 4;
      const __m512i w = _mm512_loadu_si512(tile + column * 16);
      for (int i = 0; i < kRows; ++i)
        dot[i] = _mm512_dpbusd_epi32(dot[i], w, _mm512_set1_epi32(four_codes(x[i].codes.data() + column)));
    }
    for (int i = 0; i < kRows; ++i)
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i]), _mm512_set1_ps(x[i].step[b]), acc[i]);
  }
  const __m512 scale = _mm512_loadu_ps(scales);
  for (int i = 0; i < kRows; ++i) store16(out + i * out_stride, _mm512_mul_ps(acc[i], scale));
}

// Output rows a task: both threads get work on the smallest projections, each task streams a good run of weights.
constexpr int64_t kRowsATask = 32;

torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && codes.dim() == 2 && codes.scalar_type() == torch::kInt8, "int8_linear: bad shapes");
  const int64_t m = x.size(0), k = x.size(1), n = codes.size(0);
  TORCH_CHECK(codes.size(1) == k && k % kBlock == 0 && codes.is_contiguous(), "int8_linear: K does not match");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == n, "int8_linear: one scale a row");
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  const torch::Tensor rows = bf16 ? x.contiguous() : x.to(torch::kFloat32).contiguous();
  std::vector<SignedRow> rounded;
  for (int64_t i = 0; i < m; ++i) {
    rounded.push_back(split_signs(bf16 ? round_row(rows.data_ptr<at::BFloat16>() + i * k, k, kBlock)
                                       : round_row(rows.data_ptr<float>() + i * k, k, kBlock), k));
  }
  const torch::Tensor step = scales.to(torch::kFloat32).contiguous();
  torch::Tensor out = torch::empty({m, n}, x.options().dtype(torch::kFloat32));
  const int8_t* w = codes.data_ptr<int8_t>();
  const float* st = step.data_ptr<float>();
  float* y = out.data_ptr<float>();
  at::parallel_for(0, n, kRowsATask, [&](int64_t first, int64_t end) {
    for (int64_t row = first; row < end; ++row) {
      for (int64_t i = 0; i < m; ++i) y[i * n + row] = int8_dot(w + row * k, rounded[i], k) * st[row];
    }
  });
  return out.to(x.scalar_type());
}

template <bool kFive, typename T>
void int4_product(const torch::Tensor& x, const torch::Tensor& tiles, const uint8_t* high,
                  const torch::Tensor& scale_zero, int64_t group, torch::Tensor& out) {
  const int64_t m = x.size(0), k = x.size(1), n = out.size(1);
  std::vector<RoundedRow> rounded;
  for (int64_t i = 0; i < m; ++i) rounded.push_back(round_row(x.data_ptr<T>() + i * k, k, group));
  const uint8_t* w = tiles.data_ptr<uint8_t>();
  const auto* sz = reinterpret_cast<const uint32_t*>(scale_zero.data_ptr<at::BFloat16>());
  T* y = out.data_ptr<T>();
  at::parallel_for(0, n / 16, 1, [&](int64_t first, int64_t end) {
    for (int64_t t = first; t < end; ++t) {
      const uint8_t* tile = w + t * k * 8;
      const uint8_t* marks = kFive ? high + t * k * 2 : nullptr;
      const uint32_t* pairs = sz + t * 16;
      int64_t i = 0;
      for (; i + 4 <= m; i += 4)
        int4_tile<4, kFive>(tile, marks, pairs, &rounded[i], k, group, n, y + i * n + t * 16, n);
      switch (m - i) {
        case 3: int4_tile<3, kFive>(tile, marks, pairs, &rounded[i], k, group, n, y + i * n + t * 16, n); break;
        case 2: int4_tile<2, kFive>(tile, marks, pairs, &rounded[i], k, group, n, y + i * n + t * 16, n); break;
        case 1: int4_tile<1, kFive>(tile, marks, pairs, &rounded[i], k, group, n, y + i * n + t * 16, n); break;
        default: break;
      }
    }
  });
}

// x [M, K] times tiled codes (with `high`, 5-bit ones) -> [M, N] in x's dtype.
torch::Tensor tiled_linear(const torch::Tensor& x, const torch::Tensor& tiles, const torch::Tensor* high,
                           const torch::Tensor& scale_zero, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && tiles.dim() == 2 && tiles.scalar_type() == torch::kUInt8, "int4_linear: bad shapes");
  TORCH_CHECK(scale_zero.dim() == 3 && scale_zero.size(2) == 2 && scale_zero.scalar_type() == torch::kBFloat16,
              "int4_linear: scale_zero must be bf16 [K / group, N, 2]");
  const int64_t k = x.size(1), n = tiles.size(0) * 16;
  TORCH_CHECK(tiles.size(1) == k * 8 && k % group == 0 && group % kBlock == 0, "int4_linear: K does not match");
  TORCH_CHECK(scale_zero.size(0) == k / group && scale_zero.size(1) == n, "int4_linear: scale_zero shape");
  TORCH_CHECK(tiles.is_contiguous() && scale_zero.is_contiguous(), "int4_linear: not contiguous");
  if (high != nullptr) {
    TORCH_CHECK(high->scalar_type() == torch::kUInt8 && high->dim() == 2 && high->size(0) == tiles.size(0) &&
                high->size(1) == k * 2 && high->is_contiguous(), "int5_linear: high must be uint8 [N / 16, K * 2]");
  }
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  const torch::Tensor rows = bf16 ? x.contiguous() : x.to(torch::kFloat32).contiguous();
  torch::Tensor out = torch::empty({x.size(0), n}, rows.options());
  const uint8_t* marks = high != nullptr ? high->data_ptr<uint8_t>() : nullptr;
  if (bf16 && marks != nullptr) int4_product<true, at::BFloat16>(rows, tiles, marks, scale_zero, group, out);
  else if (bf16) int4_product<false, at::BFloat16>(rows, tiles, nullptr, scale_zero, group, out);
  else if (marks != nullptr) int4_product<true, float>(rows, tiles, marks, scale_zero, group, out);
  else int4_product<false, float>(rows, tiles, nullptr, scale_zero, group, out);
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

torch::Tensor int4_linear(const torch::Tensor& x, const torch::Tensor& tiles, const torch::Tensor& scale_zero,
                          int64_t group) {
  return tiled_linear(x, tiles, nullptr, scale_zero, group);
}

torch::Tensor int5_linear(const torch::Tensor& x, const torch::Tensor& tiles, const torch::Tensor& high,
                          const torch::Tensor& scale_zero, int64_t group) {
  return tiled_linear(x, tiles, &high, scale_zero, group);
}

template <typename T>
void int8_tiled_product(const torch::Tensor& x, const torch::Tensor& tiles, const float* scales, torch::Tensor& out) {
  const int64_t m = x.size(0), k = x.size(1), n = out.size(1);
  std::vector<RoundedRow> rounded;
  for (int64_t i = 0; i < m; ++i) rounded.push_back(round_row(x.data_ptr<T>() + i * k, k, k));
  const uint8_t* w = tiles.data_ptr<uint8_t>();
  T* y = out.data_ptr<T>();
  at::parallel_for(0, n / 16, 1, [&](int64_t first, int64_t end) {
    for (int64_t t = first; t < end; ++t) {
      const uint8_t* tile = w + t * k * 16;
      int64_t i = 0;
      for (; i + 4 <= m; i += 4) int8_tile<4>(tile, scales + t * 16, &rounded[i], k, y + i * n + t * 16, n);
      switch (m - i) {
        case 3: int8_tile<3>(tile, scales + t * 16, &rounded[i], k, y + i * n + t * 16, n); break;
        case 2: int8_tile<2>(tile, scales + t * 16, &rounded[i], k, y + i * n + t * 16, n); break;
        case 1: int8_tile<1>(tile, scales + t * 16, &rounded[i], k, y + i * n + t * 16, n); break;
        default: break;
      }
    }
  });
}

// x [M, K] times int8 tiles (codes + 128) [N / 16, K * 16] with a scale a row -> [M, N] in x's dtype.
torch::Tensor int8_tiled_linear(const torch::Tensor& x, const torch::Tensor& tiles, const torch::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && tiles.dim() == 2 && tiles.scalar_type() == torch::kUInt8,
              "int8_tiled_linear: bad shapes");
  const int64_t k = x.size(1), n = tiles.size(0) * 16;
  TORCH_CHECK(tiles.size(1) == k * 16 && k % kBlock == 0 && tiles.is_contiguous(),
              "int8_tiled_linear: K does not match");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == n, "int8_tiled_linear: one scale a row");
  const torch::Tensor step = scales.to(torch::kFloat32).contiguous();
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  const torch::Tensor rows = bf16 ? x.contiguous() : x.to(torch::kFloat32).contiguous();
  torch::Tensor out = torch::empty({x.size(0), n}, rows.options());
  if (bf16) int8_tiled_product<at::BFloat16>(rows, tiles, step.data_ptr<float>(), out);
  else int8_tiled_product<float>(rows, tiles, step.data_ptr<float>(), out);
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

// e^x, 16 lanes (Cephes' single-precision polynomial, scaled by 2^n with vscalefps); lanes of -inf give 0.
inline __m512 exp16(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

// d (a multiple of 16) values as floats.
inline void load_row(const float* from, int64_t d, float* to) { std::memcpy(to, from, d * sizeof(float)); }
inline void load_row(const at::BFloat16* from, int64_t d, float* to) {
  for (int64_t j = 0; j < d; j += 16) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(from + j));
    _mm512_storeu_ps(to + j, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)));
  }
}

// Attention of one query a sequence over its context in a paged cache: the `share` query heads of key head `head`
// of one sequence. Scores in a first pass over the visible positions, softmax, values in a second pass.
template <typename T>
void attend_one(const T* q, const T* keys, const T* values, const int64_t* slots, const bool* visible, int64_t s,
                int64_t kv, int64_t d, int64_t share, int64_t head, float scale, T* out) {
  const int64_t padded = (s + 15) / 16 * 16;
  std::vector<float> query(share * d), scores(share * padded, -INFINITY), acc(share * d, 0.0f), row(d);
  load_row(q + head * share * d, share * d, query.data());
  for (float& v : query) v *= scale;
  for (int64_t p = 0; p < s; ++p) {
    if (!visible[p]) continue;
    load_row(keys + (slots[p] * kv + head) * d, d, row.data());
    for (int64_t r = 0; r < share; ++r) {
      __m512 dot = _mm512_setzero_ps();
      for (int64_t j = 0; j < d; j += 16)
        dot = _mm512_fmadd_ps(_mm512_loadu_ps(query.data() + r * d + j), _mm512_loadu_ps(row.data() + j), dot);
      scores[r * padded + p] = _mm512_reduce_add_ps(dot);
    }
  }
  std::vector<float> inverse(share);
  for (int64_t r = 0; r < share; ++r) {
    float* line = scores.data() + r * padded;
    __m512 high = _mm512_set1_ps(-INFINITY);
    for (int64_t p = 0; p < padded; p += 16) high = _mm512_max_ps(high, _mm512_loadu_ps(line + p));
    const float top = _mm512_reduce_max_ps(high);
    __m512 total = _mm512_setzero_ps();
    for (int64_t p = 0; p < padded; p += 16) {
      const __m512 e = std::isinf(top) ? _mm512_setzero_ps() : exp16(_mm512_sub_ps(_mm512_loadu_ps(line + p),
                                                                                    _mm512_set1_ps(top)));
      _mm512_storeu_ps(line + p, e);
      total = _mm512_add_ps(total, e);
    }
    const float sum = _mm512_reduce_add_ps(total);
    inverse[r] = sum > 0.0f ? 1.0f / sum : 0.0f;
  }
  for (int64_t p = 0; p < s; ++p) {
    if (!visible[p]) continue;
    load_row(values + (slots[p] * kv + head) * d, d, row.data());
    for (int64_t r = 0; r < share; ++r) {
      const __m512 weight = _mm512_set1_ps(scores[r * padded + p]);
      for (int64_t j = 0; j < d; j += 16) {
        float* a = acc.data() + r * d + j;
        _mm512_storeu_ps(a, _mm512_fmadd_ps(weight, _mm512_loadu_ps(row.data() + j), _mm512_loadu_ps(a)));
      }
    }
  }
  for (int64_t r = 0; r < share; ++r)
    for (int64_t j = 0; j < d; ++j) out[(head * share + r) * d + j] = static_cast<T>(acc[r * d + j] * inverse[r]);
}

torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& keys, const torch::Tensor& values,
                               const torch::Tensor& slots, const torch::Tensor& visible, double scale) {
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 3 && values.sizes() == keys.sizes(), "decode_attention: bad shapes");
  TORCH_CHECK(q.scalar_type() == keys.scalar_type() && keys.scalar_type() == values.scalar_type(),
              "decode_attention: q, keys and values must share a dtype");
  TORCH_CHECK(slots.dim() == 2 && slots.scalar_type() == torch::kInt64 && visible.sizes() == slots.sizes() &&
              visible.scalar_type() == torch::kBool && slots.size(0) == q.size(0), "decode_attention: slots/visible");
  const int64_t b = q.size(0), h = q.size(1), d = q.size(2), kv = keys.size(1), s = slots.size(1);
  TORCH_CHECK(keys.size(2) == d && d % 16 == 0 && h % kv == 0 && keys.is_contiguous() && values.is_contiguous(),
              "decode_attention: keys [slots, KV, D] contiguous, D a multiple of 16, H a multiple of KV");
  const torch::Tensor query = q.contiguous(), where = slots.contiguous(), seen = visible.contiguous();
  torch::Tensor out = torch::empty_like(query);
  at::parallel_for(0, b * kv, 1, [&](int64_t first, int64_t end) {
    for (int64_t item = first; item < end; ++item) {
      const int64_t row = item / kv, head = item % kv;
      const int64_t* row_slots = where.data_ptr<int64_t>() + row * s;
      const bool* row_seen = seen.data_ptr<bool>() + row * s;
      if (q.scalar_type() == torch::kBFloat16) {
        attend_one(query.data_ptr<at::BFloat16>() + row * h * d, keys.data_ptr<at::BFloat16>(),
                   values.data_ptr<at::BFloat16>(), row_slots, row_seen, s, kv, d, h / kv, head,
                   static_cast<float>(scale), out.data_ptr<at::BFloat16>() + row * h * d);
      } else {
        attend_one(query.data_ptr<float>() + row * h * d, keys.data_ptr<float>(), values.data_ptr<float>(),
                   row_slots, row_seen, s, kv, d, h / kv, head, static_cast<float>(scale),
                   out.data_ptr<float>() + row * h * d);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(ringlet_cpu, lib) {
  lib.def("int8_linear(Tensor x, Tensor codes, Tensor scales) -> Tensor");
  lib.def("int4_linear(Tensor x, Tensor tiles, Tensor scale_zero, int group) -> Tensor");
  lib.def("int8_tiled_linear(Tensor x, Tensor tiles, Tensor scales) -> Tensor");
  lib.def("int5_linear(Tensor x, Tensor tiles, Tensor high, Tensor scale_zero, int group) -> Tensor");
  lib.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor slots, Tensor visible, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(ringlet_cpu, CPU, lib) {
  lib.impl("int8_linear", &int8_linear);
  lib.impl("int4_linear", &int4_linear);
  lib.impl("int5_linear", &int5_linear);
  lib.impl("int8_tiled_linear", &int8_tiled_linear);
  lib.impl("decode_attention", &decode_attention);
}
