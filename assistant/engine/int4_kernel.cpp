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
#include <omp.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
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

// Each tile's codes are prefetched this many bytes ahead of the group being multiplied (four groups; past a tile's
// end, the next tile's): the hardware's prefetcher alone left the kernel waiting on memory. On a 2-core Intel Xeon
// (Emerald Rapids) a one-row decode step of SmolLM2-135M went from 4.74 to 3.82 ms and an eight-row step from
// 9.81 to 9.46 ms (medians of ten alternating rounds; 2,560 bytes ahead measured the same).
constexpr int64_t kPrefetchBytes = 1280;
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
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t)  // kPrefetchBytes ahead in each tile's stream
#pragma GCC unroll 8
      for (int64_t line = 0; line < kBlockBytes; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(block + t * tile_bytes + kPrefetchBytes + line), _MM_HINT_T0);
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
    case 4: return rows_times_tiles<4, T, Out>;
    case 5: return rows_times_tiles<5, T, Out>;
    case 6: return rows_times_tiles<6, T, Out>;
    case 7: return rows_times_tiles<7, T, Out>;
    default: return rows_times_tiles<8, T, Out>;
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

// Two tiles keep one row busy. Up to eight rows share each tile's codes as unpacked: on a 2-core Intel Xeon
// (Emerald Rapids) two tiles by eight rows took 0.35-0.39 ns a vpdpbusd where two by four took 0.43-0.48 (the
// codes' unpacking, three operations a chunk, is shared by twice the rows); on a 2-core AMD EPYC two by four and
// one by eight were as fast (about 1.4 cycles a vpdpbusd a core).
constexpr int kTilesAtOnce = 2;
constexpr int64_t kMaxRows = 8;

int64_t tile_units(int64_t tiles) { return (tiles + kTilesAtOnce - 1) / kTilesAtOnce; }

// Rows [row0, row_end) of the quantized inputs times the tiles of `unit` (kTilesAtOnce tiles from unit *
// kTilesAtOnce): their outputs in op (m, tiles * 16).
template <typename Out>
void multiply_unit(const int8_t* xq, const float* xscale, const float* xsum, int64_t row0, int64_t row_end, int64_t k,
                   const uint8_t* wp, int64_t groups, int64_t tiles, int64_t unit, Out* op) {
  const int64_t tile_bytes = groups * kBlockBytes;
  const int64_t tile = unit * kTilesAtOnce;
  const int tiles_here = static_cast<int>(std::min<int64_t>(kTilesAtOnce, tiles - tile));
  for (int64_t r = row0; r < row_end; r += kMaxRows) {
    const int n = static_cast<int>(std::min(kMaxRows, row_end - r));
    const Kernel<Out> kernel = tiles_here == 2 ? kernel_for_rows<2, Out>(n) : kernel_for_rows<1, Out>(n);
    kernel(xq + r * k, k, xscale + r * groups, xsum + r * groups, groups, wp + tile * tile_bytes, tile_bytes,
           op + r * tiles * kTile + tile * kTile, tiles * kTile);
  }
}

template <typename In, typename Out>
void multiply(const In* x, int64_t m, int64_t k, const uint8_t* wp, int64_t groups, int64_t tiles, Out* op) {
  std::vector<int8_t> xq(m * k);
  std::vector<float> xscale(m * groups), xsum(m * groups);
  quantize_rows(x, m, k, xq.data(), xscale.data(), xsum.data());
  at::parallel_for(0, tile_units(tiles), 1, [&](int64_t begin, int64_t end) {
    for (int64_t row0 = 0; row0 < m; row0 += kRowChunk)
      for (int64_t unit = begin; unit < end; ++unit)
        multiply_unit(xq.data(), xscale.data(), xsum.data(), row0, std::min(m, row0 + kRowChunk), k, wp, groups,
                      tiles, unit, op);
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

// out[i] = the sum of v[i]'s 16 lanes, for 16 vectors at once: a tree of shuffles and adds (about two operations
// a sum, where a sum of its own takes eight).
ASSISTANT_AVX512_VNNI inline __m512 sums_of_16(__m512 v[16]) {
  // step 1: pairs (v[2i], v[2i+1]) -> lanes that hold partial sums of both, interleaved by 128-bit quarters
  __m512 a[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    const __m512 lo = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);  // in each quarter: v0[0] v1[0] v0[1] v1[1]
    const __m512 hi = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);  // v0[2] v1[2] v0[3] v1[3]
    a[i] = _mm512_add_ps(lo, hi);  // per quarter: (v0: 0+2, v1: 0+2, v0: 1+3, v1: 1+3)
  }
  __m512 b[4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const __m512 lo = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1])));
    const __m512 hi = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1])));
    b[i] = _mm512_add_ps(lo, hi);  // per quarter: one sum each of v[4i..4i+3] over that quarter
  }
  // b[i] quarter j holds (v[4i], v[4i+1], v[4i+2], v[4i+3]) summed over quarter j: add the quarters
  __m512 c[2];
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) {
    const __m512 lo = _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512 hi = _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1));
    c[i] = _mm512_add_ps(lo, hi);  // quarters: b[2i] (q0+q1, q2+q3), b[2i+1] (q0+q1, q2+q3)
  }
  const __m512 lo = _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0));
  const __m512 hi = _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1));
  return _mm512_add_ps(lo, hi);  // quarter k: v[4k..4k+3]'s sums
}

// SLEEF's exp of sixteen float32 lanes (within one unit in the last place), the very function ATen's softmax and
// SiLU call on AVX-512 CPUs (PyTorch's CPU library bundles SLEEF and exports it): the softmax and SiLU written
// out below then round as ATen's did, so the lean step's outputs stay what they were before they were written
// out, and so do the answers that depend on a near tie.
extern "C" __m512 Sleef_expf16_u10(__m512 x);

ASSISTANT_AVX512_VNNI inline __m512 exp_ps(__m512 x) { return Sleef_expf16_u10(x); }

// One row's query heads that share key/value head h: scores[g][l] = q_g . k_l * scale + bias[l], for the
// n cached positions (k: n rows of d = 16 C, the cache's own dtype, read as it is: no float32 copy of the cache).
// Each position's key is converted once for the group's heads; sixteen positions' dot products are summed
// across their lanes together (sums_of_16).
template <int C, typename KV>
ASSISTANT_AVX512_VNNI void attention_scores(const float* q, const KV* k, int64_t n, int64_t group, double scale,
                                            const float* bias, float* scores) {
  constexpr int64_t d = 16 * C;
  const __m512 times = _mm512_set1_ps(static_cast<float>(scale));
  int64_t l0 = 0;
  for (; l0 + 16 <= n; l0 += 16)
    for (int64_t g = 0; g < group; g += 4) {  // up to four heads a pass over the block's keys
      const int64_t heads = std::min<int64_t>(4, group - g);
      __m512 dots[4][16];
      for (int64_t j = 0; j < 16; ++j) {
        __m512 key[C];
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) key[c] = load_values(k + (l0 + j) * d + 16 * c);
#pragma GCC unroll 4
        for (int64_t h = 0; h < 4; ++h) {
          if (h >= heads) break;
          __m512 acc = _mm512_setzero_ps();
#pragma GCC unroll 8
          for (int c = 0; c < C; ++c) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + (g + h) * d + 16 * c), key[c], acc);
          dots[h][j] = acc;
        }
      }
      for (int64_t h = 0; h < heads; ++h) {
        __m512 block = _mm512_mul_ps(sums_of_16(dots[h]), times);
        if (bias != nullptr) block = _mm512_add_ps(block, _mm512_loadu_ps(bias + l0));
        _mm512_storeu_ps(scores + (g + h) * n + l0, block);
      }
    }
  for (int64_t l = l0; l < n; ++l) {  // the last positions, one at a time
    __m512 key[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) key[c] = load_values(k + l * d + 16 * c);
    for (int64_t g = 0; g < group; ++g) {
      __m512 acc = _mm512_setzero_ps();
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * d + 16 * c), key[c], acc);
      const float score = _mm512_reduce_add_ps(acc) * static_cast<float>(scale);
      scores[g * n + l] = bias != nullptr ? score + bias[l] : score;
    }
  }
}

// Each of `rows` rows of n scores, in place: exp(s - max) / sum, as at::softmax computes it (SLEEF's exp, the
// sum kept in sixteen lanes, then added across them). A row of -inf only (never given: the query's own position is
// never masked) would give NaN, as at::softmax's does.
ASSISTANT_AVX512_VNNI void softmax_rows(float* scores, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = scores + r * n;
    const int64_t whole = n / 16 * 16;
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - whole)) - 1u);
    __m512 most = _mm512_set1_ps(-INFINITY);
    for (int64_t l = 0; l < whole; l += 16) most = _mm512_max_ps(most, _mm512_loadu_ps(row + l));
    most = _mm512_max_ps(most, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail, row + whole));
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(most));
    __m512 total = _mm512_setzero_ps();
    for (int64_t l = 0; l < whole; l += 16) {
      const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(row + l), top));
      total = _mm512_add_ps(total, e);
      _mm512_storeu_ps(row + l, e);
    }
    if (tail) {
      const __m512 e = _mm512_maskz_mov_ps(
          tail, exp_ps(_mm512_sub_ps(_mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail, row + whole), top)));
      total = _mm512_add_ps(total, e);
      _mm512_mask_storeu_ps(row + whole, tail, e);
    }
    const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
    for (int64_t l = 0; l < whole; l += 16) _mm512_storeu_ps(row + l, _mm512_mul_ps(_mm512_loadu_ps(row + l), inverse));
    if (tail)
      _mm512_mask_storeu_ps(row + whole, tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, row + whole), inverse));
  }
}

// out[g] = sum_l probs[g][l] v_l, in position order. Each position's values are converted once for the group's
// heads, and a head's C chunks of 16 are C sums side by side (one chain of FMAs, each waiting on the one before,
// left the CPU idle most of the time).
template <int C, typename KV>
ASSISTANT_AVX512_VNNI void attention_values(const float* probs, const KV* v, int64_t n, int64_t group, float* out) {
  constexpr int64_t d = 16 * C;
  for (int64_t g0 = 0; g0 < group; g0 += 4) {  // up to four heads a pass over the values
    const int64_t heads = std::min<int64_t>(4, group - g0);
    __m512 acc[4][C];
#pragma GCC unroll 4
    for (int h = 0; h < 4; ++h)
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[h][c] = _mm512_setzero_ps();
    for (int64_t l = 0; l < n; ++l) {
      __m512 value[C];
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) value[c] = load_values(v + l * d + 16 * c);
#pragma GCC unroll 4
      for (int64_t h = 0; h < 4; ++h) {
        if (h >= heads) break;
        const __m512 p = _mm512_set1_ps(probs[(g0 + h) * n + l]);
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) acc[h][c] = _mm512_fmadd_ps(p, value[c], acc[h][c]);
      }
    }
    for (int64_t h = 0; h < heads; ++h)
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + (g0 + h) * d + 16 * c, acc[h][c]);
  }
}

// One row and key/value head's attention: its G query heads q (G, D) float32 over the n cached keys and values
// (n rows of D = 16 C), bias (n) or null; scores: room for G n floats; the heads' outputs to out (G, D) float32.
// A row's left padding (its bias's leading -inf) is skipped: the row's own positions are summed in the same
// order, in the same blocks of sixteen, whatever padding the batch gives it, so a row's output does not depend
// on the other rows (padding attended as -inf gave the same result but for the order of sums).
template <int C, typename KV>
void attend_unit(const float* q, const KV* keys, const KV* values, int64_t n, int64_t group, double scale,
                 const float* bias, float* scores, float* out) {
  constexpr int64_t d = 16 * C;
  int64_t start = 0;
  if (bias != nullptr)
    while (start < n - 1 && std::isinf(bias[start]) && bias[start] < 0) ++start;
  n -= start;
  attention_scores<C>(q, keys + start * d, n, group, scale, bias != nullptr ? bias + start : nullptr, scores);
  softmax_rows(scores, group, n);
  attention_values<C>(scores, values + start * d, n, group, out);
}

template <typename KV>
using UnitAttention = void (*)(const float*, const KV*, const KV*, int64_t, int64_t, double, const float*, float*,
                               float*);

// attend_unit for heads of 16 C, C = 1..8 (up to 128 wide: the callers check).
template <typename KV>
UnitAttention<KV> attend_unit_for(int64_t head_dim) {
  switch (head_dim / 16) {
    case 1: return attend_unit<1, KV>;
    case 2: return attend_unit<2, KV>;
    case 3: return attend_unit<3, KV>;
    case 4: return attend_unit<4, KV>;
    case 5: return attend_unit<5, KV>;
    case 6: return attend_unit<6, KV>;
    case 7: return attend_unit<7, KV>;
    default: return attend_unit<8, KV>;
  }
}

// Attention of every row and key/value head (a unit of work each: scores, softmax and values together, one
// parallel region, where ATen's softmax between two took a third of attention's time).
template <typename KV>
void attend_cache(int64_t head_dim, const float* q, const KV* keys, const KV* values, int64_t capacity, int64_t n,
                  const float* bias, int64_t batch, int64_t kv_heads, int64_t group, double scale, at::Tensor& scores,
                  at::Tensor& out) {
  const UnitAttention<KV> attend = attend_unit_for<KV>(head_dim);
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit)
      attend(q + unit * group * head_dim, keys + unit * capacity * head_dim, values + unit * capacity * head_dim, n,
             group, scale, bias != nullptr ? bias + unit / kv_heads * n : nullptr,
             scores.data_ptr<float>() + unit * group * n, out.data_ptr<float>() + unit * group * head_dim);
  });
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
    attend_cache(head_dim, q.data_ptr<float>(), key_buffer.data_ptr<float>(), value_buffer.data_ptr<float>(),
                 capacity, n, bias_data, batch, kv_heads, group, scale, scores, out);
  else
    attend_cache(head_dim, q.data_ptr<float>(), key_buffer.data_ptr<at::BFloat16>(),
                 value_buffer.data_ptr<at::BFloat16>(), capacity, n, bias_data, batch, kv_heads, group, scale, scores,
                 out);
  return out;
}

// Rotary embedding of one head of one position, as the Python loop computes it in T (q * cos and rotate_half(q) *
// sin each rounded to T, then their sum); cos and sin (D): a query head goes to `query` in float32 (what attention
// reads), a key head (query null) to `key`.
template <typename T>
ASSISTANT_AVX512_VNNI inline void rotate_head(const T* head, const T* cos, const T* sin, int64_t d, float* query,
                                              T* key) {
  const int64_t chunks = d / 16, half = chunks / 2;
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  for (int64_t c = 0; c < chunks; ++c) {
    const __m512 x = load_values(head + 16 * c);
    const __m512i partner = _mm512_castps_si512(load_values(head + 16 * (c < half ? c + half : c - half)));
    const __m512 rotated = _mm512_castsi512_ps(c < half ? _mm512_xor_si512(partner, sign) : partner);
    const __m512 first = as_stored(_mm512_mul_ps(x, load_values(cos + 16 * c)), head);
    const __m512 second = as_stored(_mm512_mul_ps(rotated, load_values(sin + 16 * c)), head);
    const __m512 sum = _mm512_add_ps(first, second);
    if (query != nullptr)
      _mm512_storeu_ps(query + 16 * c, as_stored(sum, head));
    else
      store_values(key + 16 * c, sum);
  }
}

// One row's key/value head j and the query heads that read it (j G .. j G + G - 1, G = H / Hkv): row (H + 2 Hkv,
// D), the products' output; the query heads rotated into `query` (H, D) float32, the key head into `key` and the
// value head copied to `value` (their places in the cache buffers).
template <typename T>
ASSISTANT_AVX512_VNNI void rotate_unit(const T* row, const T* cos, const T* sin, int64_t heads, int64_t kv_heads,
                                       int64_t j, int64_t d, float* query, T* key, T* value) {
  const int64_t group = heads / kv_heads;
  for (int64_t g = j * group; g < (j + 1) * group; ++g)
    rotate_head(row + g * d, cos, sin, d, query + g * d, static_cast<T*>(nullptr));
  rotate_head(row + (heads + j) * d, cos, sin, d, nullptr, key);
  std::memcpy(value, row + (heads + kv_heads + j) * d, d * sizeof(T));
}

// rotate_unit for every row and key/value head: fused (B, H + 2 Hkv, D), cos and sin (B, D); the query heads to
// q (B, H, D) float32, keys and values into the cache buffers at `length`: one pass instead of about seventeen
// ATen operations a layer.
template <typename T>
ASSISTANT_AVX512_VNNI void rotate_into_cache(const T* fused, const T* cos, const T* sin, int64_t batch, int64_t heads,
                                             int64_t kv_heads, int64_t d, float* q, T* keys, T* values,
                                             int64_t capacity, int64_t length) {
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t j = 0; j < kv_heads; ++j) {
      const int64_t at = ((b * kv_heads + j) * capacity + length) * d;
      rotate_unit(fused + b * (heads + 2 * kv_heads) * d, cos + b * d, sin + b * d, heads, kv_heads, j, d,
                  q + b * heads * d, keys + at, values + at);
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

// What the ATen operations between the products compute, a row at a time in T: x + y and silu(gate) * up, each
// result rounded to T (bfloat16: computed in float32, rounded to nearest even; float32: as it is).
template <typename T>
ASSISTANT_AVX512_VNNI void add_into(T* x, const T* y, int64_t width) {
  for (int64_t c = 0; c < width; c += 16)
    store_values(x + c, _mm512_add_ps(load_values(x + c), load_values(y + c)));
}

template <typename T>
ASSISTANT_AVX512_VNNI void silu_times(const T* gate, const T* up, T* out, int64_t width) {
  for (int64_t c = 0; c < width; c += 16) {
    const __m512 g = load_values(gate + c);
    const __m512 negated = _mm512_sub_ps(_mm512_setzero_ps(), g);
    const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(negated)));  // as ATen's
    store_values(out + c, _mm512_mul_ps(as_stored(silu, gate), load_values(up + c)));
  }
}

template <typename T>
ASSISTANT_AVX512_VNNI void store_rounded(const float* x, T* out, int64_t width) {
  for (int64_t c = 0; c < width; c += 16) store_values(out + c, _mm512_loadu_ps(x + c));
}

// Hands out the units of one phase of decode_layers_together to whichever thread asks first, a few at a time (about
// sixteen shares a thread a phase): a thread the system holds up a moment leaves its work to the others rather
// than each waiting at the phase's end for a fixed share.
class Shares {
 public:
  Shares(int64_t phases, int threads) : next_(new std::atomic<int64_t>[phases]), threads_(threads) {
    for (int64_t p = 0; p < phases; ++p) next_[p].store(0, std::memory_order_relaxed);
  }
  // Calls work(unit) for the units of `phase` this thread takes, out of `units`.
  template <typename Work>
  void take(int64_t phase, int64_t units, Work&& work) {
    const int64_t chunk = std::max<int64_t>(1, units / (16 * threads_));
    for (;;) {
      const int64_t begin = next_[phase].fetch_add(chunk, std::memory_order_relaxed);
      if (begin >= units) return;
      for (int64_t unit = begin; unit < std::min(units, begin + chunk); ++unit) work(unit);
    }
  }

 private:
  std::unique_ptr<std::atomic<int64_t>[]> next_;
  int threads_;
};

// Whether decode_layers_together computes what decode_layers' loop does for these tensors: one dtype (bfloat16 or
// float32) for the rows, norms, rotary tables and cache buffers, all contiguous; every product the kernel's blocks
// of the widths the layer needs; heads 32 to 128 wide, a multiple of 32; a float32 bias of (B, 1, 1, length + 1).
bool together_applies(const at::Tensor& x, at::TensorList input_norms, at::TensorList post_norms, at::TensorList qkv,
                      at::TensorList o, at::TensorList gate_up, at::TensorList down, const at::Tensor& cos,
                      const at::Tensor& sin, at::TensorList key_buffers, at::TensorList value_buffers, int64_t length,
                      const std::optional<at::Tensor>& bias, int64_t heads, int64_t kv_heads, int64_t intermediate) {
  const auto dtype = x.scalar_type();
  if (!(dtype == at::kBFloat16 || dtype == at::kFloat) || x.dim() != 3 || x.size(1) != 1 || input_norms.empty())
    return false;
  const int64_t batch = x.size(0), width = x.size(2), d = cos.size(-1);
  if (d % 32 != 0 || d > 128 || kv_heads < 1 || heads % kv_heads != 0 || width % kGroup != 0 ||
      intermediate % kGroup != 0 || cos.scalar_type() != dtype || sin.scalar_type() != dtype ||
      cos.numel() != batch * d || sin.numel() != batch * d)
    return false;
  if (bias.has_value() && (bias->numel() != batch * (length + 1) || bias->dim() != 4))
    return false;
  const auto is_product = [](const at::Tensor& w, int64_t out, int64_t in) {
    return w.dim() == 3 && w.scalar_type() == at::kByte && w.is_contiguous() && w.size(0) * kTile == out &&
           w.size(1) * kGroup == in && w.size(2) == kBlockBytes;
  };
  const int64_t capacity = key_buffers[0].size(2);
  for (size_t i = 0; i < input_norms.size(); ++i) {
    for (const at::Tensor& norm : {input_norms[i], post_norms[i]})
      if (norm.scalar_type() != dtype || !norm.is_contiguous() || norm.numel() != width) return false;
    if (!is_product(qkv[i], (heads + 2 * kv_heads) * d, width) || !is_product(o[i], width, heads * d) ||
        !is_product(gate_up[i], 2 * intermediate, width) || !is_product(down[i], width, intermediate))
      return false;
    for (const at::Tensor& buffer : {key_buffers[i], value_buffers[i]})
      if (buffer.scalar_type() != dtype || !buffer.is_contiguous() || buffer.dim() != 4 || buffer.size(0) != batch ||
          buffer.size(1) != kv_heads || buffer.size(2) != capacity || buffer.size(3) != d)
        return false;
  }
  return true;
}

// decode_layers in one parallel region: each phase (a product, a row's norms and sums, a row and key/value head's
// attention) is shared by the threads, a barrier between phases, so the rows' own work between the products runs
// on every core rather than one (with a region a product, the other of two cores sat idle for two fifths of an
// eight-row step, a fifth after: the rest is the step's work outside the layers), no ATen operation is dispatched
// and no tensor allocated inside the layers. The same operations as decode_layers' loop,
// in the same order for each row. Where every product is the kernel's, without an adapter (decode_layers checks).
template <typename T>
at::Tensor decode_layers_together(const at::Tensor& x_in, at::TensorList input_norms, at::TensorList post_norms,
                                  at::TensorList qkv, at::TensorList o, at::TensorList gate_up, at::TensorList down,
                                  const at::Tensor& cos_in, const at::Tensor& sin_in, at::TensorList key_buffers,
                                  at::TensorList value_buffers, int64_t length, const std::optional<at::Tensor>& bias,
                                  int64_t heads, int64_t kv_heads, int64_t intermediate, double eps, double scale) {
  const int64_t layers = static_cast<int64_t>(input_norms.size());
  const int64_t batch = x_in.size(0), width = x_in.size(-1), d = cos_in.size(-1), group = heads / kv_heads;
  const int64_t n = length + 1, capacity = key_buffers[0].size(2), attention_width = heads * d;
  const int64_t widest = std::max({width, attention_width, intermediate});
  at::Tensor x = x_in.contiguous().clone();
  const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  T* xs = x.data_ptr<T>();
  const T* cos_data = cos.data_ptr<T>();
  const T* sin_data = sin.data_ptr<T>();
  const float* bias_data = b.defined() ? b.data_ptr<float>() : nullptr;
  struct Layer {
    const T *input_norm, *post_norm;
    const uint8_t *qkv, *o, *gate_up, *down;
    T *keys, *values;
  };
  std::vector<Layer> plan(layers);
  for (int64_t i = 0; i < layers; ++i)
    plan[i] = {input_norms[i].data_ptr<T>(), post_norms[i].data_ptr<T>(), qkv[i].data_ptr<uint8_t>(),
               o[i].data_ptr<uint8_t>(), gate_up[i].data_ptr<uint8_t>(), down[i].data_ptr<uint8_t>(),
               key_buffers[i].data_ptr<T>(), value_buffers[i].data_ptr<T>()};
  const int64_t qkv_tiles = qkv[0].size(0), o_tiles = o[0].size(0), gate_up_tiles = gate_up[0].size(0),
                down_tiles = down[0].size(0);
  // the rows' inputs to the next product as int8 (and their steps and sums), and each phase's outputs
  std::vector<int8_t> xq(batch * widest);
  std::vector<float> xscale(batch * widest / kGroup), xsum(batch * widest / kGroup);
  std::vector<T> normed(batch * width), fused(batch * qkv_tiles * kTile), projected(batch * width),
      both(batch * gate_up_tiles * kTile), staged(batch * widest);
  std::vector<float> query(batch * attention_width), attended(batch * attention_width);
  const int threads = std::max(1, at::get_num_threads());
  std::vector<float> scores(static_cast<int64_t>(threads) * group * n);
  constexpr int64_t kPhases = 8;  // a layer's phases, as numbered below
  Shares shares(layers * kPhases + 1, threads);
  // the kernel's view of T: float, or bfloat16's bits
  using Raw = std::conditional_t<std::is_same_v<T, float>, float, uint16_t>;
  const auto raw = [](auto* p) { return reinterpret_cast<std::conditional_t<std::is_const_v<std::remove_pointer_t<
                                     decltype(p)>>, const Raw*, Raw*>>(p); };
  // quantize row r's k inputs at `in` into xq, its steps and sums, as the next product reads them
  const auto quantize_row = [&](const T* in, int64_t r, int64_t k) {
    quantize_rows(raw(in), 1, k, xq.data() + r * k, xscale.data() + r * (k / kGroup), xsum.data() + r * (k / kGroup));
  };
  const auto product = [&](int64_t phase, const uint8_t* weight, int64_t k, int64_t tiles, T* out) {
    shares.take(phase, tile_units(tiles), [&](int64_t unit) {
      multiply_unit(xq.data(), xscale.data(), xsum.data(), 0, batch, k, weight, k / kGroup, tiles, unit, raw(out));
    });
  };
  const UnitAttention<T> attend = attend_unit_for<T>(d);
#pragma omp parallel num_threads(threads)
  {
    float* own_scores = scores.data() + static_cast<int64_t>(omp_get_thread_num()) * group * n;
    for (int64_t i = 0; i < layers; ++i) {
      const Layer& layer = plan[i];
      const int64_t phase = i * kPhases;
      // 0: x += the last layer's down product; the input norm, quantized for q/k/v
      shares.take(phase, batch, [&](int64_t r) {
        if (i > 0) add_into(xs + r * width, projected.data() + r * width, width);
        rms_norm_rows(xs + r * width, layer.input_norm, normed.data() + r * width, 1, width, static_cast<float>(eps));
        quantize_row(normed.data() + r * width, r, width);
      });
#pragma omp barrier
      product(phase + 1, layer.qkv, width, qkv_tiles, fused.data());  // 1: q/k/v
#pragma omp barrier
      // 2: a row and key/value head: rotary embedding into the cache, attention, its output quantized for o
      shares.take(phase + 2, batch * kv_heads, [&](int64_t unit) {
        const int64_t r = unit / kv_heads, j = unit % kv_heads, at = (unit * capacity + length) * d;
        rotate_unit(fused.data() + r * qkv_tiles * kTile, cos_data + r * d, sin_data + r * d, heads, kv_heads, j, d,
                    query.data() + r * attention_width, layer.keys + at, layer.values + at);
        const int64_t heads_at = r * attention_width + j * group * d;
        attend(query.data() + heads_at, layer.keys + unit * capacity * d, layer.values + unit * capacity * d, n, group,
               scale, bias_data != nullptr ? bias_data + r * n : nullptr, own_scores, attended.data() + heads_at);
        store_rounded(attended.data() + heads_at, staged.data() + heads_at, group * d);
        quantize_rows(raw(staged.data() + heads_at), 1, group * d, xq.data() + heads_at,
                      xscale.data() + heads_at / kGroup, xsum.data() + heads_at / kGroup);
      });
#pragma omp barrier
      product(phase + 3, layer.o, attention_width, o_tiles, projected.data());  // 3: o
#pragma omp barrier
      // 4: x += attention's output; the post-attention norm, quantized for gate/up
      shares.take(phase + 4, batch, [&](int64_t r) {
        add_into(xs + r * width, projected.data() + r * width, width);
        rms_norm_rows(xs + r * width, layer.post_norm, normed.data() + r * width, 1, width, static_cast<float>(eps));
        quantize_row(normed.data() + r * width, r, width);
      });
#pragma omp barrier
      product(phase + 5, layer.gate_up, width, gate_up_tiles, both.data());  // 5: gate/up
#pragma omp barrier
      // 6: silu(gate) * up, quantized for down
      shares.take(phase + 6, batch, [&](int64_t r) {
        const T* row = both.data() + r * 2 * intermediate;
        silu_times(row, row + intermediate, staged.data() + r * intermediate, intermediate);
        quantize_row(staged.data() + r * intermediate, r, intermediate);
      });
#pragma omp barrier
      product(phase + 7, layer.down, intermediate, down_tiles, projected.data());  // 7: down
#pragma omp barrier
    }
    shares.take(layers * kPhases, batch, [&](int64_t r) {  // x += the last layer's down product
      add_into(xs + r * width, projected.data() + r * width, width);
    });
  }
  return x;
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
  for (size_t i = 0; i < layers; ++i)
    TORCH_CHECK(key_buffers[i].size(2) > length && value_buffers[i].size(2) > length,
                "assistant::decode_layers: no room in the cache buffers");
  if (adapter_downs.empty() && together_applies(x, input_norms, post_norms, qkv, o, gate_up, down, cos, sin,
                                                key_buffers, value_buffers, length, bias, heads, kv_heads,
                                                intermediate)) {
    if (x.scalar_type() == at::kFloat)
      return decode_layers_together<float>(x, input_norms, post_norms, qkv, o, gate_up, down, cos, sin, key_buffers,
                                           value_buffers, length, bias, heads, kv_heads, intermediate, eps, scale);
    return decode_layers_together<at::BFloat16>(x, input_norms, post_norms, qkv, o, gate_up, down, cos, sin,
                                                key_buffers, value_buffers, length, bias, heads, kv_heads,
                                                intermediate, eps, scale);
  }
  for (size_t i = 0; i < layers; ++i) {
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

// The index of the largest of n float32 values: the first, on ties; the first NaN, if any (as torch.argmax).
ASSISTANT_AVX512_VNNI int64_t argmax_row(const float* x, int64_t n) {
  const int64_t whole = n / 16 * 16;
  __m512 most = _mm512_set1_ps(-INFINITY);
  __mmask16 nan = 0;
  for (int64_t i = 0; i < whole; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    most = _mm512_max_ps(most, v);
  }
  float top = _mm512_reduce_max_ps(most);
  for (int64_t i = whole; i < n; ++i) {
    if (std::isnan(x[i])) nan = 1;
    top = std::max(top, x[i]);
  }
  if (nan != 0) {
    for (int64_t i = 0; i < n; ++i)
      if (std::isnan(x[i])) return i;
  }
  const __m512 wanted = _mm512_set1_ps(top);
  for (int64_t i = 0; i < whole; i += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), wanted, _CMP_EQ_OQ);
    if (hit != 0) return i + __builtin_ctz(hit);
  }
  for (int64_t i = whole; i < n; ++i)
    if (x[i] == top) return i;
  return 0;  // every value -inf (the first is the largest)
}

// torch.argmax(logits, -1) for (B, V) float32 logits: (B,) int64. ATen's took 0.39 ms for eight rows of SmolLM2's
// 49,152 logits on a 2-core Intel Xeon (about 45 us a row, a tenth of a decode step's cost a row).
at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.device().is_cpu() &&
                  logits.size(1) > 0,
              "assistant::argmax_rows: logits must be a 2-d float32 CPU tensor with at least one column");
  const at::Tensor x = logits.contiguous();
  const int64_t rows = x.size(0), width = x.size(1);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  const float* data = x.data_ptr<float>();
  int64_t* picks = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) picks[r] = argmax_row(data + r * width, width);
  });
  return out;
}

bool int4_supported() { return cpu_supported(); }

}  // namespace

TORCH_LIBRARY(assistant, m) {
  m.def("int4_mm(Tensor rows, Tensor packed) -> Tensor");
  m.def("decode_layers(Tensor x, Tensor[] input_norms, Tensor[] post_norms, Tensor[] qkv, Tensor[] o, "
        "Tensor[] gate_up, Tensor[] down, Tensor cos, Tensor sin, Tensor(a!)[] key_buffers, "
        "Tensor(b!)[] value_buffers, int length, Tensor? bias, int heads, int kv_heads, int intermediate, "
        "float eps, float scale, Tensor?[] adapter_downs, Tensor?[] adapter_ups) -> Tensor");
  m.def("argmax_rows(Tensor logits) -> Tensor");
  m.def("int4_supported() -> bool", int4_supported);
}

TORCH_LIBRARY_IMPL(assistant, CPU, m) {
  m.impl("int4_mm", int4_mm);
  m.impl("decode_layers", decode_layers);
  m.impl("argmax_rows", argmax_rows);
}
