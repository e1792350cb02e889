// The packed product y = x @ W, shared by every instruction-set level.
//
// W is a QArray's (K, N) matrix as stored (see pqjax/_src/core/packing.py): codes
// packed along K in units of C codes in UB bytes (2 bits: 4 codes a byte, 4 bits: 2,
// 3 and 5 to 7 bits: 8 codes in `bits` bytes as a little-endian bit stream, 8 bits:
// one signed int8 code), each byte row of the codes holding one byte of every column.
// A packed code is an index into the table of levels (an int8 code q is index
// q + levels / 2). Block scales are (NK, NC): NK blocks of ceil(K / NK) rows, NC = 1
// or N columns, stored as float32, float16, or uint8 255ths of a float32 column scale.
//
// Everything here has internal linkage: each instruction-set translation unit gets
// its own copy, compiled for its own target, so no code built for a wider ISA can be
// picked by the linker for a narrower one.
#ifndef PQJAX_NATIVE_KERNEL_H_
#define PQJAX_NATIVE_KERNEL_H_

#include <cstdint>
#include <cstring>

// Small loops over registers (rows of x, column vectors) must be unrolled for their
// sums to stay in registers; -O2 alone does not.
#if defined(__clang__)
#define PQJAX_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define PQJAX_UNROLL _Pragma("GCC unroll 16")
#else
#define PQJAX_UNROLL
#endif

namespace pqjax {

enum ScaleKind : int { kScaleF32 = 0, kScaleF16 = 1, kScaleU8 = 2 };
// The dtype the decoded weights are rounded to before the product (the weight's own
// dtype where it is narrower than float32), as decode-then-dot rounds them.
enum Rounding : int { kRoundNone = 0, kRoundBF16 = 1, kRoundF16 = 2 };
enum Level : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// What does not change across the products of one call.
struct Spec {
  int bits;
  int64_t k, n;       // the weight's (K, N)
  int64_t nk, nc;     // scale blocks
  int scale_kind;     // ScaleKind
  int rounding;       // Rounding
  const float* table; // 256 levels: the table, padded (see PaddedTable)
};

// One product: x (m, k) float32 rows, contiguous, times the weight, into out (m, n).
struct Matrix {
  const float* x;
  const uint8_t* codes;  // (packed rows, n)
  const void* scale;     // (nk, nc)
  const float* column;   // (nc): the column scales of uint8 scales, else unused
  float* out;
  int64_t m;
};

namespace {

constexpr int CodesPerUnit(int bits) {
  return bits == 2 ? 4 : bits == 4 ? 2 : bits == 8 ? 1 : 8;
}
constexpr int UnitBytes(int bits) {
  return (bits == 2 || bits == 4 || bits == 8) ? 1 : bits;
}

// Work items (ranges of columns shared between threads) start at multiples of this,
// a multiple of every tile's width: a column then meets the same tile code whatever
// the number of threads, so results are bit-identical across thread counts.
constexpr int64_t kItemAlign = 256;

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float16 bits to float32, exactly.
inline float HalfToFloat(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  if (exp == 0x1f) return BitsFloat(sign | 0x7f800000 | (man << 13));
  if (exp != 0) return BitsFloat(sign | ((exp + 112) << 23) | (man << 13));
  // Subnormal: man * 2^-24, exact in float32 arithmetic on normal numbers.
  float v = float(man) * 5.9604644775390625e-8f;
  return sign ? -v : v;
}

// float32 rounded to the nearest bfloat16 (ties to even), as float32. Levels times
// scales are finite, so NaN needs no care.
inline float RoundBF16(float f) {
  uint32_t u = FloatBits(f);
  u += 0x7fff + ((u >> 16) & 1);
  return BitsFloat(u & 0xffff0000u);
}

// float32 rounded to the nearest float16 (ties to even), as float32; past the largest
// float16 it is infinite, as a conversion to float16 gives.
inline float RoundF16(float f) {
  uint32_t u = FloatBits(f);
  uint32_t sign = u & 0x80000000u, a = u ^ sign;
  if (a >= 0x477ff000u) return BitsFloat(sign | (a > 0x7f800000u ? a : 0x7f800000u));
  if (a < 0x38800000u) {
    // float16 subnormals are multiples of 2^-24: round |f| * 2^24 to an integer.
    float v = BitsFloat(a) * 16777216.0f;
    v = (v + 8388608.0f) - 8388608.0f;
    return BitsFloat(sign | FloatBits(v * 5.9604644775390625e-8f));
  }
  a += 0xfff + ((a >> 13) & 1);
  return BitsFloat(sign | (a & ~0x1fffu));
}

template <int R>
inline float RoundTo(float f) {
  if (R == kRoundBF16) return RoundBF16(f);
  if (R == kRoundF16) return RoundF16(f);
  return f;
}

// The uint8 scale u stands for u / 255 of its column's scale: float32 division is
// correctly rounded, so this is the float32 nearest u / 255, the value pqjax stores
// in its table of steps (checked for all 256 counts by the tests).
inline float StepFraction(uint32_t u) { return float(u) / 255.0f; }

}  // namespace
}  // namespace pqjax

#endif  // PQJAX_NATIVE_KERNEL_H_
