// AVX-512 tiles (F, BW, VL, DQ with FMA and F16C): 16 levels a vpermps.
//
// At 2 and 4 bits a code byte row is read 64 columns at a time, and each 32-bit lane
// (4 columns) is shifted so that the code wanted sits in its low bits: vpermps reads
// only those, so no mask and no widening of bytes is needed, and the sums are kept
// with lane i of sum b holding column 4i + b, put back in order once per segment.
// Measured on a 4096 x 4096 4-bit weight, one row, one thread: 0.52 ms against
// 0.71 ms for widening 16 bytes to 16 lanes first (one more shuffle on port 5 for
// every 32 weights).
// At 3 and 5 to 7 bits a unit's bytes are widened to 32-bit lanes and joined into
// its bit stream; levels come from vpermps (3 bits), vpermi2ps (5 bits), two of them
// and a blend (6 bits), or a gather (7 and 8 bits).
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <cstdint>
#include <utility>

#include "kernel.h"

#if defined(__clang__)
#pragma clang attribute push(                                                   \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif

#include "driver.h"

namespace pqjax {
namespace {

template <int... I, class F>
inline void Unroll(std::integer_sequence<int, I...>, F&& f) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, class F>
inline void For(F&& f) {
  Unroll(std::make_integer_sequence<int, N>{}, f);
}

// 64-bit pairs of p and q interleaved (unpack{lo,hi}_pd on float vectors).
inline __m512 PairsLo(__m512 p, __m512 q) {
  return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(p), _mm512_castps_pd(q)));
}
inline __m512 PairsHi(__m512 p, __m512 q) {
  return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(p), _mm512_castps_pd(q)));
}

inline void Prefetch(const uint8_t* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
}

template <int R>
inline __m512 Round(__m512 w) {
  if constexpr (R == kRoundBF16) {
    __m512i u = _mm512_castps_si512(w);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(0xffff0000u)));
  } else if constexpr (R == kRoundF16) {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT));
  } else {
    return w;
  }
}

inline __mmask16 Mask16(int valid) {
  return valid >= 16 ? __mmask16(0xffff) : __mmask16((1u << (valid > 0 ? valid : 0)) - 1);
}
inline __mmask64 Mask64(int valid) {
  return valid >= 64 ? ~__mmask64(0) : (__mmask64(1) << (valid > 0 ? valid : 0)) - 1;
}

// out[c] += sum[c] * scale[c] (sum[c] where weights were rounded), 16 columns.
template <int R>
inline void AddOut(const Tile& t, float* out, int col, __m512 sum) {
  __mmask16 mask = Mask16(t.cols - col);
  if (!mask) return;
  __m512 o = _mm512_maskz_loadu_ps(mask, out + col);
  if constexpr (R != kRoundNone) {
    o = _mm512_add_ps(o, sum);
  } else {
    __m512 s = t.scale ? _mm512_maskz_loadu_ps(mask, t.scale + col)
                       : _mm512_set1_ps(t.scale0);
    o = _mm512_fmadd_ps(sum, s, o);
  }
  _mm512_mask_storeu_ps(out + col, mask, o);
}

// The tile's scale of each column, 64 columns from `col`, zero past the tile.
inline void TileScales(const Tile& t, int col, float* dst) {
  for (int c = 0; c < 64; ++c) {
    dst[c] = col + c < t.cols ? (t.scale ? t.scale[col + c] : t.scale0) : 0.0f;
  }
}

// Codes are prefetched this many bytes ahead along their byte row. A segment reads
// its byte rows side by side, more streams than the hardware prefetcher follows. A
// 4096 x 4096 4-bit weight, one row, one thread: 4.2 ms in cache without prefetches,
// 0.65 ms with; out of cache (40 copies in turn) 0.90 ms at 128 bytes, 0.88 at 256,
// 0.92 at 512 (into L2), 1.24 at 1024.
constexpr int kAhead = 256;

struct Avx512 {
  // Rows of x a tile holds. 16 rows are bound by the multiply-adds, not decoding:
  // decoding a tile once into L1 for all 16 rows, then multiplying 4 rows at a time,
  // took the same time as decoding it again for each 4 rows (a 4096 x 4096 4-bit
  // weight, 16 rows, one thread: 7.0 ms either way).
  static constexpr int kMaxRows = 4;

  static constexpr bool Strided(int bits) { return bits == 2 || bits == 4; }
  // 64-column groups of a strided tile, 16-column vectors of a plain one: 16 sums.
  static constexpr int Groups(int mr) { return mr == 4 ? 1 : 2; }
  static constexpr int Vectors(int mr) { return mr == 4 ? 2 : 4; }

  template <int BITS, int MR>
  static constexpr int Width() {
    return Strided(BITS) ? 64 * Groups(MR) : 16 * Vectors(MR);
  }

  template <int BITS, int MR, int R>
  static void Run(const Tile& t) {
    if constexpr (Strided(BITS)) {
      RunStrided<BITS, MR, R>(t);
    } else {
      RunPlain<BITS, MR, R>(t);
    }
  }

  // Lane i of sums b is column 4i + b: add them to 4 x 16 columns of `out` in order.
  template <int R>
  static void AddStrided(const Tile& t, float* out, int col, const __m512* a) {
    __m512 t0 = _mm512_unpacklo_ps(a[0], a[1]), t1 = _mm512_unpackhi_ps(a[0], a[1]);
    __m512 t2 = _mm512_unpacklo_ps(a[2], a[3]), t3 = _mm512_unpackhi_ps(a[2], a[3]);
    // u_i: 128-bit lane L holds columns 16L + 4i .. 16L + 4i + 3.
    __m512 u0 = PairsLo(t0, t2), u1 = PairsHi(t0, t2);
    __m512 u2 = PairsLo(t1, t3), u3 = PairsHi(t1, t3);
    __m512 v0 = _mm512_shuffle_f32x4(u0, u1, 0x44), v1 = _mm512_shuffle_f32x4(u0, u1, 0xee);
    __m512 v2 = _mm512_shuffle_f32x4(u2, u3, 0x44), v3 = _mm512_shuffle_f32x4(u2, u3, 0xee);
    AddOut<R>(t, out, col, _mm512_shuffle_f32x4(v0, v2, 0x88));
    AddOut<R>(t, out, col + 16, _mm512_shuffle_f32x4(v0, v2, 0xdd));
    AddOut<R>(t, out, col + 32, _mm512_shuffle_f32x4(v1, v3, 0x88));
    AddOut<R>(t, out, col + 48, _mm512_shuffle_f32x4(v1, v3, 0xdd));
  }

  template <int BITS, int MR, int R>
  static void RunStrided(const Tile& t) {
    constexpr int G = Groups(MR);
    constexpr int C = CodesPerUnit(BITS);
    const __m512 table = _mm512_loadu_ps(t.table);
    // Masked loads only at the last columns: plain loads were 3-5% faster (4096 x
    // 4096 and 768 x 50257, one row, one thread: 0.67 against 0.70 ms, 1.50 against
    // 1.58 ms).
    const bool full = t.cols == 64 * G;
    __mmask64 load[G];
    __m512 sum[MR][G][4];
    __m512 scale[G][4];
    PQJAX_UNROLL
    for (int g = 0; g < G; ++g) {
      load[g] = Mask64(t.cols - 64 * g);
      PQJAX_UNROLL
      for (int m = 0; m < MR; ++m) {
        PQJAX_UNROLL
        for (int b = 0; b < 4; ++b) sum[m][g][b] = _mm512_setzero_ps();
      }
      if constexpr (R != kRoundNone) {
        alignas(64) float plain[64], strided[64];
        TileScales(t, 64 * g, plain);
        PQJAX_UNROLL
        for (int b = 0; b < 4; ++b) {
          for (int i = 0; i < 16; ++i) strided[16 * b + i] = plain[4 * i + b];
          scale[g][b] = _mm512_load_ps(strided + 16 * b);
        }
      }
    }
    for (int64_t u = 0; u < t.units; ++u) {
      const uint8_t* row = t.codes + u * t.n;
      PQJAX_UNROLL
      for (int g = 0; g < G; ++g) Prefetch(row + kAhead + 64 * g);
      __m512i word[G];
      PQJAX_UNROLL
      for (int g = 0; g < G; ++g) {
        word[g] = full ? _mm512_loadu_si512(row + 64 * g)
                       : _mm512_maskz_loadu_epi8(load[g], row + 64 * g);
      }
      const float* x = t.x + u * C;
      For<C>([&](auto j) {
        __m512 xv[MR];
        PQJAX_UNROLL
        for (int m = 0; m < MR; ++m) xv[m] = _mm512_set1_ps(x[m * t.x_rows + j]);
        PQJAX_UNROLL
        for (int g = 0; g < G; ++g) {
          For<4>([&](auto b) {
            __m512i index = _mm512_srli_epi32(word[g], 8 * b + BITS * j);
            __m512 level = _mm512_permutexvar_ps(index, table);
            if constexpr (R != kRoundNone) {
              level = Round<R>(_mm512_mul_ps(level, scale[g][b]));
            }
            PQJAX_UNROLL
            for (int m = 0; m < MR; ++m) {
              sum[m][g][b] = _mm512_fmadd_ps(xv[m], level, sum[m][g][b]);
            }
          });
        }
      });
    }
    PQJAX_UNROLL
    for (int m = 0; m < MR; ++m) {
      float* out = t.out + m * t.out_rows;
      PQJAX_UNROLL
      for (int g = 0; g < G; ++g) {
        AddStrided<R>(t, out, 64 * g, sum[m][g]);
      }
    }
  }

  // Code J of the units whose bit streams are lo (bytes 0-3) and hi (bytes 4-6).
  template <int BITS, int J>
  static __m512i Code(__m512i lo, __m512i hi) {
    constexpr int s = J * BITS;
    if constexpr (BITS == 8) {
      return lo;
    } else if constexpr (s + BITS <= 32) {
      return _mm512_srli_epi32(lo, s);
    } else if constexpr (s >= 32) {
      return _mm512_srli_epi32(hi, s - 32);
    } else {
      return _mm512_or_si512(_mm512_srli_epi32(lo, s), _mm512_slli_epi32(hi, 32 - s));
    }
  }

  // Levels of 32 * 2^depth entries from `table`: vpermi2ps on each 32, then a
  // binary tree of blends on the index's bits 5 and up.
  template <int DEPTH>
  static __m512 Tree(__m512i index, const float* table) {
    if constexpr (DEPTH == 0) {
      return _mm512_permutex2var_ps(_mm512_loadu_ps(table), index, _mm512_loadu_ps(table + 16));
    } else {
      constexpr int half = 16 << DEPTH;
      const __mmask16 high = _mm512_test_epi32_mask(index, _mm512_set1_epi32(half));
      return _mm512_mask_blend_ps(high, Tree<DEPTH - 1>(index, table),
                                  Tree<DEPTH - 1>(index, table + half));
    }
  }

  // Levels of codes whose low BITS bits are the index (higher bits are ignored). At 7
  // bits a tree of vpermi2ps and blends, at 8 bits a gather. A 4096 x 4096 weight,
  // one row, one thread: 7 bits 3.0 ms with the tree, 4.0 ms with a gather (16 rows:
  // 15.7 against 22.5 ms); 8 bits 9.1 ms with the tree (twice the instructions),
  // 7.7 ms with a gather (16 rows: 88 against 68 ms).
  template <int BITS>
  static __m512 Level(__m512i index, const __m512* tables, const float* table) {
    if constexpr (BITS <= 4) {
      return _mm512_permutexvar_ps(index, tables[0]);
    } else if constexpr (BITS == 5) {
      return _mm512_permutex2var_ps(tables[0], index, tables[1]);
    } else if constexpr (BITS == 6) {
      __m512 a = _mm512_permutex2var_ps(tables[0], index, tables[1]);
      __m512 b = _mm512_permutex2var_ps(tables[2], index, tables[3]);
      return _mm512_mask_blend_ps(_mm512_test_epi32_mask(index, _mm512_set1_epi32(32)), a, b);
    } else if constexpr (BITS == 7) {
      return Tree<2>(index, table);
    } else {
      return _mm512_i32gather_ps(index, table, 4);
    }
  }

  template <int BITS, int MR, int R>
  static void RunPlain(const Tile& t) {
    constexpr int V = Vectors(MR);
    constexpr int C = CodesPerUnit(BITS), UB = UnitBytes(BITS);
    __m512 tables[4];
    for (int i = 0; i < 4; ++i) {
      tables[i] = BITS <= 6 && 16 * i < (1 << BITS) ? _mm512_loadu_ps(t.table + 16 * i)
                                                    : _mm512_setzero_ps();
    }
    __mmask16 load[V];
    __m512 sum[MR][V], scale[V];
    PQJAX_UNROLL
    for (int v = 0; v < V; ++v) {
      load[v] = Mask16(t.cols - 16 * v);
      PQJAX_UNROLL
      for (int m = 0; m < MR; ++m) sum[m][v] = _mm512_setzero_ps();
      if constexpr (R != kRoundNone) {
        scale[v] = t.scale ? _mm512_maskz_loadu_ps(load[v], t.scale + 16 * v)
                           : _mm512_set1_ps(t.scale0);
      }
    }
    for (int64_t u = 0; u < t.units; ++u) {
      __m512i lo[V], hi[V];
      PQJAX_UNROLL
      for (int v = 0; v < V; ++v) {
        const uint8_t* p = t.codes + u * UB * t.n + 16 * v;
        if (v % 4 == 0) {
          for (int i = 0; i < UB; ++i) Prefetch(p + i * t.n + kAhead);
        }
        lo[v] = hi[v] = _mm512_setzero_si512();
        For<UB>([&](auto i) {
          __m128i bytes = _mm_maskz_loadu_epi8(load[v], p + i * t.n);
          __m512i wide = BITS == 8 ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes);
          if constexpr (i < 4) {
            lo[v] = _mm512_or_si512(lo[v], _mm512_slli_epi32(wide, 8 * i));
          } else {
            hi[v] = _mm512_or_si512(hi[v], _mm512_slli_epi32(wide, 8 * (i - 4)));
          }
        });
      }
      const float* x = t.x + u * C;
      For<C>([&](auto j) {
        __m512 xv[MR];
        PQJAX_UNROLL
        for (int m = 0; m < MR; ++m) xv[m] = _mm512_set1_ps(x[m * t.x_rows + j]);
        PQJAX_UNROLL
        for (int v = 0; v < V; ++v) {
          __m512 level = Level<BITS>(Code<BITS, j>(lo[v], hi[v]), tables, t.table);
          if constexpr (R != kRoundNone) level = Round<R>(_mm512_mul_ps(level, scale[v]));
          PQJAX_UNROLL
          for (int m = 0; m < MR; ++m) {
            sum[m][v] = _mm512_fmadd_ps(xv[m], level, sum[m][v]);
          }
        }
      });
    }
    PQJAX_UNROLL
    for (int m = 0; m < MR; ++m) {
      PQJAX_UNROLL
      for (int v = 0; v < V; ++v) AddOut<R>(t, t.out + m * t.out_rows, 16 * v, sum[m][v]);
    }
  }
};

}  // namespace

namespace avx512 {
void Product(const Spec& s, const Matrix& a, int64_t c0, int64_t c1, float* buf) {
  pqjax::Product<Avx512>(s, a, c0, c1, buf);
}
}  // namespace avx512
}  // namespace pqjax

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // x86-64
