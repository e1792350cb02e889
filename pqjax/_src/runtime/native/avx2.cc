// AVX2 tiles (with FMA and F16C): 8 levels a vpermps.
//
// At 2 and 4 bits, as in the AVX-512 tiles, each 32-bit lane of a code byte row is
// shifted so the code sits in its low bits; 16 levels take two vpermps and a blend on
// the code's top bit (moved to the lane's sign bit). At 3 bits one vpermps; at 5 to 8
// bits a gather. AVX2 has no masked byte loads: a tile narrower than its width (the
// last columns of a weight) runs the portable tile.
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <cstdint>
#include <utility>

#include "kernel.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
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
inline __m256 PairsLo(__m256 p, __m256 q) {
  return _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(p), _mm256_castps_pd(q)));
}
inline __m256 PairsHi(__m256 p, __m256 q) {
  return _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(p), _mm256_castps_pd(q)));
}

inline void Prefetch(const uint8_t* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
}

template <int R>
inline __m256 Round(__m256 w) {
  if constexpr (R == kRoundBF16) {
    __m256i u = _mm256_castps_si256(w);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
    return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32(0xffff0000u)));
  } else if constexpr (R == kRoundF16) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT));
  } else {
    return w;
  }
}

// out[c] += sum[c] * scale[c] (sum[c] where weights were rounded), 8 whole columns.
template <int R>
inline void AddOut(const Tile& t, float* out, int col, __m256 sum) {
  __m256 o = _mm256_loadu_ps(out + col);
  if constexpr (R != kRoundNone) {
    o = _mm256_add_ps(o, sum);
  } else {
    __m256 s = t.scale ? _mm256_loadu_ps(t.scale + col) : _mm256_set1_ps(t.scale0);
    o = _mm256_fmadd_ps(sum, s, o);
  }
  _mm256_storeu_ps(out + col, o);
}

// Codes are prefetched this many bytes ahead along their byte row (see avx512.cc).
constexpr int kAhead = 256;

struct Avx2 {
  static constexpr int kMaxRows = 2;

  static constexpr bool Strided(int bits) { return bits == 2 || bits == 4; }
  // 32-column groups of a strided tile, 8-column vectors of a plain one: 8 sums.
  static constexpr int Groups(int mr) { return mr == 2 ? 1 : 2; }
  static constexpr int Vectors(int mr) { return mr == 2 ? 2 : 4; }

  template <int BITS, int MR>
  static constexpr int Width() {
    return Strided(BITS) ? 32 * Groups(MR) : 8 * Vectors(MR);
  }

  template <int BITS, int MR, int R>
  static void Run(const Tile& t) {
    if (t.cols < Width<BITS, MR>()) {
      for (int c = 0; c < t.cols; c += kScalarWidth) {
        Tile part = t;
        part.codes += c;
        part.out += c;
        if (part.scale) part.scale += c;
        part.cols = t.cols - c < kScalarWidth ? t.cols - c : kScalarWidth;
        ScalarTile<BITS, MR, R>(part);
      }
    } else if constexpr (Strided(BITS)) {
      RunStrided<BITS, MR, R>(t);
    } else {
      RunPlain<BITS, MR, R>(t);
    }
  }

  template <int BITS, int MR, int R>
  static void RunStrided(const Tile& t) {
    constexpr int G = Groups(MR);
    constexpr int C = CodesPerUnit(BITS);
    // 2 bits: entry i is the level of i & 3, so the next code's bit is ignored.
    const __m256 low = _mm256_loadu_ps(t.table), high = _mm256_loadu_ps(t.table + 8);
    __m256 sum[MR][G][4];
    __m256 scale[G][4];
    PQJAX_UNROLL
    for (int g = 0; g < G; ++g) {
      PQJAX_UNROLL
      for (int m = 0; m < MR; ++m) {
        PQJAX_UNROLL
        for (int b = 0; b < 4; ++b) sum[m][g][b] = _mm256_setzero_ps();
      }
      if constexpr (R != kRoundNone) {
        alignas(32) float strided[32];
        PQJAX_UNROLL
        for (int b = 0; b < 4; ++b) {
          for (int i = 0; i < 8; ++i) {
            int c = 32 * g + 4 * i + b;
            strided[8 * b + i] = t.scale ? t.scale[c] : t.scale0;
          }
          scale[g][b] = _mm256_load_ps(strided + 8 * b);
        }
      }
    }
    for (int64_t u = 0; u < t.units; ++u) {
      const uint8_t* row = t.codes + u * t.n;
      for (int g = 0; g < G; g += 2) Prefetch(row + kAhead + 32 * g);
      __m256i word[G];
      PQJAX_UNROLL
      for (int g = 0; g < G; ++g) {
        word[g] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * g));
      }
      const float* x = t.x + u * C;
      For<C>([&](auto j) {
        __m256 xv[MR];
        PQJAX_UNROLL
        for (int m = 0; m < MR; ++m) xv[m] = _mm256_set1_ps(x[m * t.x_rows + j]);
        PQJAX_UNROLL
        for (int g = 0; g < G; ++g) {
          For<4>([&](auto b) {
            constexpr int s = 8 * b + BITS * j;
            __m256i index = _mm256_srli_epi32(word[g], s);
            __m256 level;
            if constexpr (BITS == 2) {
              level = _mm256_permutevar8x32_ps(low, index);
            } else {
              __m256 top = _mm256_castsi256_ps(_mm256_slli_epi32(word[g], 28 - s));
              level = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, index),
                                       _mm256_permutevar8x32_ps(high, index), top);
            }
            if constexpr (R != kRoundNone) {
              level = Round<R>(_mm256_mul_ps(level, scale[g][b]));
            }
            PQJAX_UNROLL
            for (int m = 0; m < MR; ++m) {
              sum[m][g][b] = _mm256_fmadd_ps(xv[m], level, sum[m][g][b]);
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
        // Lane i of sum b is column 4i + b: transpose back to 4 x 8 columns.
        __m256* a = sum[m][g];
        __m256 t0 = _mm256_unpacklo_ps(a[0], a[1]), t1 = _mm256_unpackhi_ps(a[0], a[1]);
        __m256 t2 = _mm256_unpacklo_ps(a[2], a[3]), t3 = _mm256_unpackhi_ps(a[2], a[3]);
        // u_i: 128-bit lane L holds columns 16L + 4i .. 16L + 4i + 3.
        __m256 u0 = PairsLo(t0, t2), u1 = PairsHi(t0, t2), u2 = PairsLo(t1, t3), u3 = PairsHi(t1, t3);
        AddOut<R>(t, out, 32 * g, _mm256_permute2f128_ps(u0, u1, 0x20));
        AddOut<R>(t, out, 32 * g + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
        AddOut<R>(t, out, 32 * g + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
        AddOut<R>(t, out, 32 * g + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
      }
    }
  }

  template <int BITS, int J>
  static __m256i Code(__m256i lo, __m256i hi) {
    constexpr int s = J * BITS;
    if constexpr (BITS == 8) {
      return lo;
    } else if constexpr (s + BITS <= 32) {
      return _mm256_srli_epi32(lo, s);
    } else if constexpr (s >= 32) {
      return _mm256_srli_epi32(hi, s - 32);
    } else {
      return _mm256_or_si256(_mm256_srli_epi32(lo, s), _mm256_slli_epi32(hi, 32 - s));
    }
  }

  template <int BITS>
  static __m256 Level(__m256i index, __m256 table8, const float* table) {
    if constexpr (BITS == 3) {
      return _mm256_permutevar8x32_ps(table8, index);
    } else if constexpr (BITS == 8) {
      return _mm256_i32gather_ps(table, index, 4);
    } else {
      __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
      return _mm256_i32gather_ps(table, _mm256_and_si256(index, mask), 4);
    }
  }

  template <int BITS, int MR, int R>
  static void RunPlain(const Tile& t) {
    constexpr int V = Vectors(MR);
    constexpr int C = CodesPerUnit(BITS), UB = UnitBytes(BITS);
    const __m256 table8 = _mm256_loadu_ps(t.table);
    __m256 sum[MR][V], scale[V];
    PQJAX_UNROLL
    for (int v = 0; v < V; ++v) {
      PQJAX_UNROLL
      for (int m = 0; m < MR; ++m) sum[m][v] = _mm256_setzero_ps();
      if constexpr (R != kRoundNone) {
        scale[v] = t.scale ? _mm256_loadu_ps(t.scale + 8 * v) : _mm256_set1_ps(t.scale0);
      }
    }
    for (int64_t u = 0; u < t.units; ++u) {
      __m256i lo[V], hi[V];
      PQJAX_UNROLL
      for (int v = 0; v < V; ++v) {
        const uint8_t* p = t.codes + u * UB * t.n + 8 * v;
        if (v % 8 == 0) {
          for (int i = 0; i < UB; ++i) Prefetch(p + i * t.n + kAhead);
        }
        lo[v] = hi[v] = _mm256_setzero_si256();
        For<UB>([&](auto i) {
          __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + i * t.n));
          __m256i wide = BITS == 8 ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes);
          if constexpr (i < 4) {
            lo[v] = _mm256_or_si256(lo[v], _mm256_slli_epi32(wide, 8 * i));
          } else {
            hi[v] = _mm256_or_si256(hi[v], _mm256_slli_epi32(wide, 8 * (i - 4)));
          }
        });
      }
      const float* x = t.x + u * C;
      For<C>([&](auto j) {
        __m256 xv[MR];
        PQJAX_UNROLL
        for (int m = 0; m < MR; ++m) xv[m] = _mm256_set1_ps(x[m * t.x_rows + j]);
        PQJAX_UNROLL
        for (int v = 0; v < V; ++v) {
          __m256 level = Level<BITS>(Code<BITS, j>(lo[v], hi[v]), table8, t.table);
          if constexpr (R != kRoundNone) level = Round<R>(_mm256_mul_ps(level, scale[v]));
          PQJAX_UNROLL
          for (int m = 0; m < MR; ++m) {
            sum[m][v] = _mm256_fmadd_ps(xv[m], level, sum[m][v]);
          }
        }
      });
    }
    PQJAX_UNROLL
    for (int m = 0; m < MR; ++m) {
      PQJAX_UNROLL
      for (int v = 0; v < V; ++v) AddOut<R>(t, t.out + m * t.out_rows, 8 * v, sum[m][v]);
    }
  }
};

}  // namespace

namespace avx2 {
void Product(const Spec& s, const Matrix& a, int64_t c0, int64_t c1, float* buf) {
  pqjax::Product<Avx2>(s, a, c0, c1, buf);
}
}  // namespace avx2
}  // namespace pqjax

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // x86-64
