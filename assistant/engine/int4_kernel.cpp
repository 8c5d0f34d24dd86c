// int4-cpu's matrix product on CPUs with AVX512-VNNI: rows of bfloat16 inputs times 4-bit weights (groups of 32
// inputs with a bfloat16 scale and zero per group and output), fast for one row and for many. See
// assistant/engine/int4_kernel.py for why and for what it computes.
//
// Layout (built by int4_kernel.pack): a uint8 tensor (out / 16, in / 32, 320), one 320-byte block per 16
// outputs (a "tile") and 32 inputs (a "group"): 256 bytes of codes, then 16 bf16 scales, then 16 bf16 zeros.
// The codes are four 64-byte chunks; in chunk c, byte b of the 32-bit lane n holds the code of output n for
// input 8c + b in its low nibble and for input 8c + 4 + b in its high nibble. Masked, a chunk's low and high
// nibbles are the unsigned bytes vpdpbusd multiplies with four broadcast int8 inputs.
//
// Each row's inputs are rounded to int8 per group (step max|x| / 127) and the weight w = (code - 8) * scale +
// zero gives, per group, scale * step * sum(code * xq) + (zero - 8 * scale) * sum(x). The integer sums are
// exact; the float32 steps are the same instructions in the same order for a row whatever the other rows are,
// so a row's output does not depend on the batch.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kTile = 16;
constexpr int64_t kBlockBytes = 320;
constexpr int64_t kScalesOffset = 256;
constexpr int64_t kZerosOffset = 288;
constexpr int64_t kRowChunk = 64;  // rows at a time for long prompts, so their inputs stay in cache

#define ASSISTANT_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

ASSISTANT_AVX512_VNNI inline __m512 load_bf16(const uint8_t* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// Rounds to bfloat16, nearest even (as PyTorch does); NaN stays NaN.
ASSISTANT_AVX512_VNNI inline __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(bits, _mm512_set1_epi32(0x00400000)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

// Rounds to the nearest bfloat16 (even on ties), kept as float32.
ASSISTANT_AVX512_VNNI inline __m512 round_to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_castsi512_ps(_mm512_and_si512(rounded, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// R rows times T consecutive tiles, all groups: out[r][16 t .. 16 t + 15]. xq: the rows' inputs as int8,
// xscale / xsum: per row and group, the int8 step and the sum of the inputs.
template <int R, int T, typename Out>
ASSISTANT_AVX512_VNNI void rows_times_tiles(const int8_t* xq, int64_t ldx, const float* xscale, const float* xsum,
                                            int64_t groups, const uint8_t* w, int64_t tile_bytes, Out* out,
                                            int64_t ldo) {
  constexpr bool kSplit = R * T < 4;  // few rows and tiles: a second chain of products keeps the CPU busy
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  __m512 acc[R][T];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i even[R][T], odd[R][T];  // two chains of products, for the CPU's sake (integers: order is free)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) even[r][t] = odd[r][t] = _mm512_setzero_si512();
    const uint8_t* block = w + g * kBlockBytes;
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      __m512i low[T], high[T];  // inputs 8c..8c+3 and 8c+4..8c+7 of the group, codes as bytes: lane n = output n
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) {
        const __m512i chunk = _mm512_loadu_si512(reinterpret_cast<const void*>(block + t * tile_bytes + c * 64));
        low[t] = _mm512_and_si512(chunk, low_nibbles);
        high[t] = _mm512_and_si512(_mm512_srli_epi16(chunk, 4), low_nibbles);
      }
      const int64_t k = g * kGroup + 8 * c;
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        int32_t first, second;
        std::memcpy(&first, xq + r * ldx + k, sizeof(first));
        std::memcpy(&second, xq + r * ldx + k + 4, sizeof(second));
        const __m512i xa = _mm512_set1_epi32(first), xb = _mm512_set1_epi32(second);
#pragma GCC unroll 16
        for (int t = 0; t < T; ++t) {
          even[r][t] = _mm512_dpbusd_epi32(even[r][t], low[t], xa);
          __m512i& chain = kSplit ? odd[r][t] : even[r][t];
          chain = _mm512_dpbusd_epi32(chain, high[t], xb);
        }
      }
    }
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      const __m512 scale = load_bf16(block + t * tile_bytes + kScalesOffset);
      const __m512 zero = load_bf16(block + t * tile_bytes + kZerosOffset);
      const __m512 offset = _mm512_fmadd_ps(scale, _mm512_set1_ps(-8.0f), zero);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(even[r][t], odd[r][t]));
        const __m512 step = _mm512_mul_ps(scale, _mm512_set1_ps(xscale[r * groups + g]));
        acc[r][t] = _mm512_fmadd_ps(dot, step, acc[r][t]);
        acc[r][t] = _mm512_fmadd_ps(offset, _mm512_set1_ps(xsum[r * groups + g]), acc[r][t]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t)
      if constexpr (std::is_same_v<Out, float>)  // rounded to bfloat16 too, as PyTorch's kernel's outputs were
        _mm512_storeu_ps(out + r * ldo + t * kTile, round_to_bf16(acc[r][t]));
      else
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ldo + t * kTile), to_bf16(acc[r][t]));
}

template <typename Out>
using Kernel = void (*)(const int8_t*, int64_t, const float*, const float*, int64_t, const uint8_t*, int64_t, Out*,
                        int64_t);

template <int T, typename Out>
Kernel<Out> kernel_for_rows(int rows) {
  switch (rows) {
    case 1: return rows_times_tiles<1, T, Out>;
    case 2: return rows_times_tiles<2, T, Out>;
    case 3: return rows_times_tiles<3, T, Out>;
    default: return rows_times_tiles<4, T, Out>;
  }
}

ASSISTANT_AVX512_VNNI inline __m512 load_row(const uint16_t* p) {
  return load_bf16(reinterpret_cast<const uint8_t*>(p));
}

// float32 inputs are rounded to bfloat16 first, as bfloat16 rows are (and the outputs after): a difference in
// the last bits of a float32 input (another summation order upstream: a padded batch, a chunked prefill) then
// almost never reaches the result, so batched rows and chunked prefills keep their tokens, as they did on
// PyTorch's kernel, which computes in bfloat16.
ASSISTANT_AVX512_VNNI inline __m512 load_row(const float* p) { return round_to_bf16(_mm512_loadu_ps(p)); }

// Each row's groups of 32 inputs as int8 with a step of max|x| / 127 (what llama.cpp's Q8 does), and the
// group's sum of the inputs themselves: the same arithmetic for a row whatever the other rows are.
template <typename In>
ASSISTANT_AVX512_VNNI void quantize_rows(const In* x, int64_t m, int64_t k, int8_t* xq, float* xscale,
                                         float* xsum) {
  const int64_t groups = k / kGroup;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const In* p = x + r * k + g * kGroup;
      const __m512 a = load_row(p), b = load_row(p + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
      const float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
      const __m512 times = _mm512_set1_ps(inverse);
      int8_t* q = xq + r * k + g * kGroup;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q),
                       _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(a, times))));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16),
                       _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(b, times))));
      xscale[r * groups + g] = amax / 127.0f;
      xsum[r * groups + g] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    }
}

bool cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

template <typename In, typename Out>
void multiply(const In* x, int64_t m, int64_t k, const uint8_t* wp, int64_t groups, int64_t tiles, Out* op) {
  std::vector<int8_t> xq(m * k);
  std::vector<float> xscale(m * groups), xsum(m * groups);
  quantize_rows(x, m, k, xq.data(), xscale.data(), xsum.data());
  const int64_t tile_bytes = groups * kBlockBytes;
  // Measured on a 2-core AMD EPYC: two tiles by four rows and one tile by eight rows were as fast at eight
  // rows (about 1.4 cycles a vpdpbusd a core); two tiles also keep one row busy.
  constexpr int tiles_at_once = 2;
  constexpr int64_t max_rows = 4;
  at::parallel_for(0, (tiles + tiles_at_once - 1) / tiles_at_once, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row0 = 0; row0 < m; row0 += kRowChunk) {
      const int64_t row_end = std::min(m, row0 + kRowChunk);
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t tile = unit * tiles_at_once;
        const int tiles_here = static_cast<int>(std::min<int64_t>(tiles_at_once, tiles - tile));
        for (int64_t r = row0; r < row_end; r += max_rows) {
          const int n = static_cast<int>(std::min(max_rows, row_end - r));
          const Kernel<Out> kernel = tiles_here == 2 ? kernel_for_rows<2, Out>(n) : kernel_for_rows<1, Out>(n);
          kernel(xq.data() + r * k, k, xscale.data() + r * groups, xsum.data() + r * groups, groups,
                 wp + tile * tile_bytes, tile_bytes, op + r * tiles * kTile + tile * kTile, tiles * kTile);
        }
      }
    }
  });
}

// rows (m, in) bfloat16 or float32 times the packed weight: (m, out) in the rows' dtype.
at::Tensor int4_mm(const at::Tensor& rows, const at::Tensor& packed) {
  static const bool supported = cpu_supported();  // asked once, not on every product of every step
  TORCH_CHECK(supported, "assistant::int4_mm needs a CPU with AVX512-VNNI");
  TORCH_CHECK(rows.dim() == 2 && rows.device().is_cpu() &&
                  (rows.scalar_type() == at::kBFloat16 || rows.scalar_type() == at::kFloat),
              "assistant::int4_mm: rows must be a 2-d bfloat16 or float32 CPU tensor");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.size(2) == kBlockBytes &&
                  packed.is_contiguous(),
              "assistant::int4_mm: packed must be a contiguous uint8 tensor (out / 16, in / 32, 320)");
  TORCH_CHECK(rows.size(1) == packed.size(1) * kGroup, "assistant::int4_mm: rows have ", rows.size(1),
              " inputs, the weight ", packed.size(1) * kGroup);
  const at::Tensor x = rows.contiguous();
  const int64_t m = x.size(0), k = x.size(1), groups = packed.size(1), tiles = packed.size(0);
  at::Tensor out = at::empty({m, tiles * kTile}, x.options());
  if (m == 0) return out;
  const auto* wp = packed.data_ptr<uint8_t>();
  if (x.scalar_type() == at::kFloat)
    multiply(x.data_ptr<float>(), m, k, wp, groups, tiles, out.data_ptr<float>());
  else
    multiply(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), m, k, wp, groups, tiles,
             reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  return out;
}

// The lean decode step's layers (assistant/engine/fast_decode.py, FastDecoder.step) in one call, for a model
// whose products are all this kernel's: the same ATen operations in the same order as the Python loop except
// for the norms, the rotary embedding and attention, written out below, without the loop's per-operation Python
// cost (about 55 operations a layer, a few microseconds each, were a third of a step for one row).
ASSISTANT_AVX512_VNNI inline __m512 load_values(const at::BFloat16* p) {
  return load_bf16(reinterpret_cast<const uint8_t*>(p));
}
ASSISTANT_AVX512_VNNI inline __m512 load_values(const float* p) { return _mm512_loadu_ps(p); }
ASSISTANT_AVX512_VNNI inline void store_values(at::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(v));
}
ASSISTANT_AVX512_VNNI inline void store_values(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
// What storing in T and loading back gives: bfloat16 rounding, or nothing for float32.
ASSISTANT_AVX512_VNNI inline __m512 as_stored(__m512 v, const at::BFloat16*) { return round_to_bf16(v); }
ASSISTANT_AVX512_VNNI inline __m512 as_stored(__m512 v, const float*) { return v; }

// transformers' LlamaRMSNorm a row at a time: x / sqrt(mean(x^2) + eps) in float32, rounded to T, then times the
// weight, rounded to T: the ATen operations' roundings in one pass (about eight operations, each a few
// microseconds of dispatch, twice a layer); the sum of squares in another order.
template <typename T>
ASSISTANT_AVX512_VNNI void rms_norm_rows(const T* x, const T* weight, T* out, int64_t rows, int64_t width,
                                         float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * width;
    __m512 squares = _mm512_setzero_ps();
    for (int64_t c = 0; c < width; c += 16) {
      const __m512 v = load_values(row + c);
      squares = _mm512_fmadd_ps(v, v, squares);
    }
    const float inverse = 1.0f / std::sqrt(_mm512_reduce_add_ps(squares) / static_cast<float>(width) + eps);
    const __m512 times = _mm512_set1_ps(inverse);
    for (int64_t c = 0; c < width; c += 16) {
      const __m512 normed = as_stored(_mm512_mul_ps(load_values(row + c), times), row);
      store_values(out + r * width + c, _mm512_mul_ps(load_values(weight + c), normed));
    }
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t width = x.size(-1);
  if (x.is_contiguous() && weight.is_contiguous() && weight.scalar_type() == x.scalar_type() &&
      weight.numel() == width && width % 16 == 0 &&
      (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat)) {
    at::Tensor out = at::empty_like(x);
    const int64_t rows = x.numel() / width;
    if (x.scalar_type() == at::kFloat)
      rms_norm_rows(x.data_ptr<float>(), weight.data_ptr<float>(), out.data_ptr<float>(), rows, width,
                    static_cast<float>(eps));
    else
      rms_norm_rows(x.data_ptr<at::BFloat16>(), weight.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(),
                    rows, width, static_cast<float>(eps));
    return out;
  }
  const at::Tensor f = x.to(at::kFloat);
  return weight * (f * at::rsqrt(f.pow(2).mean(-1, true) + eps)).to(x.scalar_type());
}

// The lean step's FusedLinear: the packed product, plus the LoRA adapter's two small products where it is on.
at::Tensor product(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& down = {},
                   const std::optional<at::Tensor>& up = {}) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(-1);
  at::Tensor out = int4_mm(x.reshape({-1, x.size(-1)}), packed).reshape(shape);
  if (out.scalar_type() != x.scalar_type()) out = out.to(x.scalar_type());
  if (!down.has_value()) return out;
  const at::Tensor delta = at::linear(at::linear(x.to(down->scalar_type()), *down), *up);
  return (out + delta).to(out.scalar_type());
}

// One row's query heads that share key/value head h: scores[g][l] = q_g . k_l * scale + bias[l], for the
// n cached positions (k: n rows of d = 16 C, the cache's own dtype, read as it is: no float32 copy of the cache).
// Each position's key is converted once for the group's heads.
template <int C, typename KV>
ASSISTANT_AVX512_VNNI void attention_scores(const float* q, const KV* k, int64_t n, int64_t group, double scale,
                                            const float* bias, float* scores) {
  constexpr int64_t d = 16 * C;
  for (int64_t l = 0; l < n; ++l) {
    __m512 key[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) key[c] = load_values(k + l * d + 16 * c);
    for (int64_t g = 0; g < group; ++g) {
      __m512 acc = _mm512_setzero_ps();
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * d + 16 * c), key[c], acc);
      float score = _mm512_reduce_add_ps(acc) * static_cast<float>(scale);
      scores[g * n + l] = bias != nullptr ? score + bias[l] : score;
    }
  }
}

// out[g] = sum_l probs[g][l] v_l, in position order. A head's C chunks of 16 are C sums side by side: one chain
// of FMAs, each waiting on the one before (4 cycles), left the CPU idle most of the time.
template <int C, typename KV>
ASSISTANT_AVX512_VNNI void attention_values(const float* probs, const KV* v, int64_t n, int64_t group, float* out) {
  constexpr int64_t d = 16 * C;
  for (int64_t g = 0; g < group; ++g) {
    __m512 acc[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
    for (int64_t l = 0; l < n; ++l) {
      const __m512 p = _mm512_set1_ps(probs[g * n + l]);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(p, load_values(v + l * d + 16 * c), acc[c]);
    }
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + g * d + 16 * c, acc[c]);
  }
}

// Attention of one query position, for every row and head: query (B, Hq, 1, D); keys and values the cache
// buffers (B, Hkv, capacity, D), their first n positions used; bias (B, 1, 1, n) float32 (-inf on left
// padding) or none. Returns (B, Hkv, Hq / Hkv, D) float32, query heads in order (head h reads key/value head
// h / (Hq / Hkv), as transformers' repeat_kv). What FastDecoder._attend computes, without casting the cache
// to float32 every step; float32 throughout, sums in another order.
template <int C, typename KV>
void attend_cache(const float* q, const KV* keys, const KV* values, int64_t capacity, int64_t n,
                  const float* bias, int64_t batch, int64_t kv_heads, int64_t group, double scale,
                  at::Tensor& scores, at::Tensor& out) {
  constexpr int64_t head_dim = 16 * C;
  const int64_t units = batch * kv_heads;  // (row, key/value head): each is one unit of work
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit)
      attention_scores<C>(q + unit * group * head_dim, keys + unit * capacity * head_dim, n, group, scale,
                          bias != nullptr ? bias + unit / kv_heads * n : nullptr,
                          scores.data_ptr<float>() + unit * group * n);
  });
  const at::Tensor probs = scores.softmax(-1);
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit)
      attention_values<C>(probs.data_ptr<float>() + unit * group * n, values + unit * capacity * head_dim, n,
                          group, out.data_ptr<float>() + unit * group * head_dim);
  });
}

// attend_cache for heads of 16 C, C = 1..8 (up to 128 wide; the check in attend keeps to those).
template <typename KV>
void attend_cache_for(int64_t head_dim, const float* q, const KV* keys, const KV* values, int64_t capacity,
                      int64_t n, const float* bias, int64_t batch, int64_t kv_heads, int64_t group, double scale,
                      at::Tensor& scores, at::Tensor& out) {
  switch (head_dim / 16) {
#define ASSISTANT_ATTEND(C) \
    case C: return attend_cache<C>(q, keys, values, capacity, n, bias, batch, kv_heads, group, scale, scores, out);
    ASSISTANT_ATTEND(1) ASSISTANT_ATTEND(2) ASSISTANT_ATTEND(3) ASSISTANT_ATTEND(4)
    ASSISTANT_ATTEND(5) ASSISTANT_ATTEND(6) ASSISTANT_ATTEND(7) ASSISTANT_ATTEND(8)
#undef ASSISTANT_ATTEND
  }
  TORCH_CHECK(false, "assistant::decode_layers: heads of 16 to 128 wide");
}

// Attention of one query position, for every row and head: query (B, Hq, 1, D); keys and values the cache
// buffers (B, Hkv, capacity, D), their first n positions used; bias (B, 1, 1, n) float32 (-inf on left
// padding) or none. Returns (B, Hkv, Hq / Hkv, D) float32, query heads in order (head h reads key/value head
// h / (Hq / Hkv), as transformers' repeat_kv). What FastDecoder._attend computes, without casting the cache
// to float32 every step; float32 throughout, sums in another order.
at::Tensor attend(const at::Tensor& query, const at::Tensor& key_buffer, const at::Tensor& value_buffer,
                  int64_t n, const std::optional<at::Tensor>& bias, int64_t head_dim, double scale) {
  const int64_t batch = query.size(0), kv_heads = key_buffer.size(1), group = query.size(1) / kv_heads;
  const int64_t capacity = key_buffer.size(2);
  TORCH_CHECK(key_buffer.is_contiguous() && value_buffer.is_contiguous() && head_dim % 16 == 0 && head_dim <= 128 &&
                  key_buffer.scalar_type() == value_buffer.scalar_type() &&
                  (key_buffer.scalar_type() == at::kFloat || key_buffer.scalar_type() == at::kBFloat16),
              "assistant::decode_layers: contiguous float32 or bf16 cache buffers of one dtype, and heads of a "
              "multiple of 16 up to 128");
  const at::Tensor q = query.to(at::kFloat).contiguous();
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bias_data = b.defined() ? b.data_ptr<float>() : nullptr;
  at::Tensor scores = at::empty({batch, kv_heads, group, n}, q.options());
  at::Tensor out = at::empty({batch, kv_heads, group, head_dim}, q.options());
  if (key_buffer.scalar_type() == at::kFloat)
    attend_cache_for(head_dim, q.data_ptr<float>(), key_buffer.data_ptr<float>(), value_buffer.data_ptr<float>(),
                     capacity, n, bias_data, batch, kv_heads, group, scale, scores, out);
  else
    attend_cache_for(head_dim, q.data_ptr<float>(), key_buffer.data_ptr<at::BFloat16>(),
                     value_buffer.data_ptr<at::BFloat16>(), capacity, n, bias_data, batch, kv_heads, group, scale,
                     scores, out);
  return out;
}

// Rotary embedding of one position a row, as the Python loop computes it in T (q * cos and rotate_half(q) * sin
// each rounded to T, then their sum): fused (B, H + 2 Hkv, D), the products' output; cos and sin (B, D). The
// query heads go to q (B, H, D) float32 (what attention reads), the key heads into the key buffer at `length`,
// the value heads into the value buffer: one pass instead of about seventeen ATen operations a layer.
template <typename T>
ASSISTANT_AVX512_VNNI void rotate_into_cache(const T* fused, const T* cos, const T* sin, int64_t batch, int64_t heads,
                                             int64_t kv_heads, int64_t d, float* q, T* keys, T* values,
                                             int64_t capacity, int64_t length) {
  const int64_t chunks = d / 16, half = chunks / 2;
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  for (int64_t b = 0; b < batch; ++b) {
    const T* row = fused + b * (heads + 2 * kv_heads) * d;
    for (int64_t h = 0; h < heads + kv_heads; ++h) {
      const T* head = row + h * d;
      const bool is_query = h < heads;
      T* key = is_query ? nullptr : keys + ((b * kv_heads + (h - heads)) * capacity + length) * d;
      for (int64_t c = 0; c < chunks; ++c) {
        const __m512 x = load_values(head + 16 * c);
        const __m512i partner = _mm512_castps_si512(load_values(head + 16 * (c < half ? c + half : c - half)));
        const __m512 rotated = _mm512_castsi512_ps(c < half ? _mm512_xor_si512(partner, sign) : partner);
        const __m512 first = as_stored(_mm512_mul_ps(x, load_values(cos + b * d + 16 * c)), head);
        const __m512 second = as_stored(_mm512_mul_ps(rotated, load_values(sin + b * d + 16 * c)), head);
        const __m512 sum = _mm512_add_ps(first, second);
        if (is_query)
          _mm512_storeu_ps(q + (b * heads + h) * d + 16 * c, as_stored(sum, head));
        else
          store_values(key + 16 * c, sum);
      }
    }
    for (int64_t h = 0; h < kv_heads; ++h)
      std::memcpy(values + ((b * kv_heads + h) * capacity + length) * d, row + (heads + kv_heads + h) * d,
                  d * sizeof(T));
  }
}

// rotate_into_cache where the tensors allow it (one dtype, contiguous, heads a multiple of 32 wide): the query
// heads (B, H, 1, D) float32; else none, and the caller does it with ATen.
std::optional<at::Tensor> rotate_into_cache_for(const at::Tensor& fused, const at::Tensor& cos, const at::Tensor& sin,
                                                const at::Tensor& key_buffer, const at::Tensor& value_buffer,
                                                int64_t length, int64_t heads, int64_t kv_heads, int64_t head_dim) {
  const auto dtype = fused.scalar_type();
  const int64_t batch = fused.size(0);
  if (head_dim % 32 != 0 || !(dtype == at::kBFloat16 || dtype == at::kFloat) || cos.scalar_type() != dtype ||
      sin.scalar_type() != dtype || key_buffer.scalar_type() != dtype || value_buffer.scalar_type() != dtype ||
      !fused.is_contiguous() || !key_buffer.is_contiguous() || !value_buffer.is_contiguous() ||
      fused.numel() != batch * (heads + 2 * kv_heads) * head_dim || cos.numel() != batch * head_dim ||
      sin.numel() != batch * head_dim)
    return std::nullopt;
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  at::Tensor q = at::empty({batch, heads, 1, head_dim}, fused.options().dtype(at::kFloat));
  const int64_t capacity = key_buffer.size(2);
  if (dtype == at::kFloat)
    rotate_into_cache(fused.data_ptr<float>(), c.data_ptr<float>(), s.data_ptr<float>(), batch, heads, kv_heads,
                      head_dim, q.data_ptr<float>(), key_buffer.data_ptr<float>(), value_buffer.data_ptr<float>(),
                      capacity, length);
  else
    rotate_into_cache(fused.data_ptr<at::BFloat16>(), c.data_ptr<at::BFloat16>(), s.data_ptr<at::BFloat16>(), batch,
                      heads, kv_heads, head_dim, q.data_ptr<float>(), key_buffer.data_ptr<at::BFloat16>(),
                      value_buffer.data_ptr<at::BFloat16>(), capacity, length);
  return q;
}

at::Tensor decode_layers(at::Tensor x, at::TensorList input_norms, at::TensorList post_norms, at::TensorList qkv,
                         at::TensorList o, at::TensorList gate_up, at::TensorList down, const at::Tensor& cos,
                         const at::Tensor& sin, at::TensorList key_buffers, at::TensorList value_buffers,
                         int64_t length, const std::optional<at::Tensor>& bias, int64_t heads, int64_t kv_heads,
                         int64_t intermediate, double eps, double scale,
                         const c10::List<std::optional<at::Tensor>>& adapter_downs,
                         const c10::List<std::optional<at::Tensor>>& adapter_ups) {
  const size_t layers = input_norms.size();
  TORCH_CHECK(adapter_downs.size() == adapter_ups.size() &&
                  (adapter_downs.empty() || adapter_downs.size() == 4 * layers),
              "assistant::decode_layers: no adapter, or one (or None) for each product of each layer");
  // the adapter of product p (0 q/k/v, 1 o, 2 gate/up, 3 down) of layer i, or none
  const auto adapter = [&](size_t i, size_t p, bool is_up) -> std::optional<at::Tensor> {
    if (adapter_downs.empty()) return std::nullopt;
    return (is_up ? adapter_ups : adapter_downs).get(4 * i + p);
  };
  TORCH_CHECK(post_norms.size() == layers && qkv.size() == layers && o.size() == layers &&
                  gate_up.size() == layers && down.size() == layers && key_buffers.size() == layers &&
                  value_buffers.size() == layers,
              "assistant::decode_layers: one of each tensor a layer");
  const int64_t batch = x.size(0), head_dim = cos.size(-1), half = head_dim / 2;
  for (size_t i = 0; i < layers; ++i) {
    TORCH_CHECK(key_buffers[i].size(2) > length && value_buffers[i].size(2) > length,
                "assistant::decode_layers: no room in the cache buffers");
    at::Tensor h = rms_norm(x, input_norms[i], eps);
    const at::Tensor products = product(h, qkv[i], adapter(i, 0, false), adapter(i, 0, true));
    std::optional<at::Tensor> query =
        rotate_into_cache_for(products, cos, sin, key_buffers[i], value_buffers[i], length, heads, kv_heads, head_dim);
    if (!query.has_value()) {
      const at::Tensor fused = products.view({batch, 1, heads + 2 * kv_heads, head_dim}).transpose(1, 2);
      at::Tensor qk = fused.slice(1, 0, heads + kv_heads);
      qk = qk * cos + at::cat({-qk.slice(-1, half), qk.slice(-1, 0, half)}, -1) * sin;
      key_buffers[i].select(2, length).copy_(qk.slice(1, heads).select(2, 0));
      value_buffers[i].select(2, length).copy_(fused.slice(1, heads + kv_heads).select(2, 0));
      query = qk.slice(1, 0, heads);
    }
    const at::Tensor attended = attend(*query, key_buffers[i], value_buffers[i], length + 1, bias, head_dim, scale);
    x = x + product(attended.reshape({batch, 1, heads * head_dim}).to(x.scalar_type()), o[i],
                    adapter(i, 1, false), adapter(i, 1, true));
    h = rms_norm(x, post_norms[i], eps);
    const at::Tensor both = product(h, gate_up[i], adapter(i, 2, false), adapter(i, 2, true));
    x = x + product(at::silu(both.slice(-1, 0, intermediate)) * both.slice(-1, intermediate), down[i],
                    adapter(i, 3, false), adapter(i, 3, true));
  }
  return x;
}

bool int4_supported() { return cpu_supported(); }

}  // namespace

TORCH_LIBRARY(assistant, m) {
  m.def("int4_mm(Tensor rows, Tensor packed) -> Tensor");
  m.def("decode_layers(Tensor x, Tensor[] input_norms, Tensor[] post_norms, Tensor[] qkv, Tensor[] o, "
        "Tensor[] gate_up, Tensor[] down, Tensor cos, Tensor sin, Tensor(a!)[] key_buffers, "
        "Tensor(b!)[] value_buffers, int length, Tensor? bias, int heads, int kv_heads, int intermediate, "
        "float eps, float scale, Tensor?[] adapter_downs, Tensor?[] adapter_ups) -> Tensor");
  m.def("int4_supported() -> bool", int4_supported);
}

TORCH_LIBRARY_IMPL(assistant, CPU, m) {
  m.impl("int4_mm", int4_mm);
  m.impl("decode_layers", decode_layers);
}
