// The loop nest of the packed product, generic over an instruction-set backend.
//
// Included once by each instruction-set translation unit, inside its target region:
// everything is in an anonymous namespace, so each unit compiles its own copy for
// its own target. A backend V provides, for a width of BITS and MR rows of x:
//   V::kMaxRows                      rows of x one tile holds (1, 2 or 4)
//   V::Width<BITS, MR>()             columns of one tile
//   V::Run<BITS, MR, R>(const Tile&) accumulate a tile and add it to the output
//
// Loop order (one work item: a range of columns, all rows of x):
//   for each segment of K (at most kChunkRows byte rows of codes, one scale block)
//     for each tile of MR rows of x
//       for each tile of columns: sum x * level over the segment's rows in
//         registers, then out += sum * scale (out += sum of x * rounded weights when
//         the weights are rounded to their dtype)
// Walking K in segments across all columns of the item reads each byte row of the
// codes from start to end, one page after the other. Walking one tile of 256 columns
// down all of K instead touched a new page at every byte row: a 4096 x 11008 4-bit
// weight (one row, one thread, in cache) took 13.3 ms that way, 1.7-2.2 ms in
// segments (with the prefetches of the backends).
#ifndef PQJAX_NATIVE_DRIVER_H_
#define PQJAX_NATIVE_DRIVER_H_

#include "kernel.h"

namespace pqjax {
namespace {

// One tile: MR rows of x times `cols` columns of a run of packing units.
struct Tile {
  const uint8_t* codes;  // the first unit's first byte row, at the tile's first column
  int64_t n;             // bytes between byte rows of the codes (the weight's N)
  int64_t units;
  const float* x;  // x[m * x_rows + u * C + j]: row m, code j of unit u
  int64_t x_rows;
  const float* scale;  // the tile's block scale of each column; null: `scale0` for all
  float scale0;
  float* out;  // out[m * out_rows + c]
  int64_t out_rows;
  int cols;
  const float* table;  // padded levels (see the handler); at 8 bits, level of code 0
};

// Byte rows of the codes in one segment of K (rounded to whole packing units). The
// segment's rows are read side by side, one stream each: 16 to 24 rows kept a
// one-row product of a 768 x 50257 4-bit weight (one thread) at 2.2-2.6 ms, where
// 64 rows took 10 ms; 8 rows lost to the cost of adding each segment's sums.
constexpr int64_t kChunkRows = 16;
// Columns of the portable tile (and of the tails of tiles of backends without
// masked loads).
constexpr int kScalarWidth = 16;

inline int64_t Min(int64_t a, int64_t b) { return a < b ? a : b; }

// The portable tile: plain loops over columns that the compiler may vectorise.
template <int BITS, int MR, int R>
void ScalarTile(const Tile& t) {
  constexpr int C = CodesPerUnit(BITS), UB = UnitBytes(BITS);
  constexpr uint64_t kMask = (uint64_t(1) << BITS) - 1;
  float acc[MR][kScalarWidth] = {};
  float s[kScalarWidth];
  for (int c = 0; c < t.cols; ++c) s[c] = t.scale ? t.scale[c] : t.scale0;
  for (int64_t u = 0; u < t.units; ++u) {
    int32_t idx[C][kScalarWidth];
    for (int c = 0; c < t.cols; ++c) {
      uint64_t w = 0;
      for (int i = 0; i < UB; ++i) {
        w |= uint64_t(t.codes[(u * UB + i) * t.n + c]) << (8 * i);
      }
      for (int j = 0; j < C; ++j) {
        idx[j][c] = BITS == 8 ? int32_t(int8_t(uint8_t(w)))
                              : int32_t((w >> (j * BITS)) & kMask);
      }
    }
    for (int j = 0; j < C; ++j) {
      for (int m = 0; m < MR; ++m) {
        const float xv = t.x[m * t.x_rows + u * C + j];
        for (int c = 0; c < t.cols; ++c) {
          float level = t.table[idx[j][c]];
          if (R != kRoundNone) level = RoundTo<R>(level * s[c]);
          acc[m][c] += xv * level;
        }
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    float* o = t.out + m * t.out_rows;
    for (int c = 0; c < t.cols; ++c) {
      o[c] += R != kRoundNone ? acc[m][c] : acc[m][c] * s[c];
    }
  }
}

// Block b's scale of each column in [c0, c1): a pointer into the stored float32
// scales, or values decoded into `buf`; a scalar where one scale serves every column.
inline void BlockScales(const Spec& s, const Matrix& a, int64_t b, int64_t c0,
                        int64_t c1, float* buf, const float** scale, float* scale0) {
  auto value = [&](int64_t c) -> float {
    int64_t i = b * s.nc + c;
    if (s.scale_kind == kScaleF32) return static_cast<const float*>(a.scale)[i];
    if (s.scale_kind == kScaleF16) {
      return HalfToFloat(static_cast<const uint16_t*>(a.scale)[i]);
    }
    return StepFraction(static_cast<const uint8_t*>(a.scale)[i]) * a.column[c];
  };
  if (s.nc == 1) {
    *scale = nullptr;
    *scale0 = value(0);
  } else if (s.scale_kind == kScaleF32) {
    *scale = static_cast<const float*>(a.scale) + b * s.nc + c0;
  } else {
    for (int64_t c = c0; c < c1; ++c) buf[c - c0] = value(c);
    *scale = buf;
  }
}

// Where one segment of K, rows [r0, r1) under one scale block, meets the codes.
struct Segment {
  int64_t r0, r1;
  int64_t whole0, whole1;  // whole packing units [whole0, whole1)
  int64_t cut[2];          // units cut by the segment's ends: x outside it is zero
  int ncut;
  const float* scale;  // block scales of the columns from c0, or null: scale0
  float scale0;
};

// Rows [m0, m0 + MR) of x times one segment of K, for columns [c0, c1).
template <class V, int BITS, int MR, int R>
void RowsSegment(const Spec& s, const Matrix& a, const Segment& g, int64_t m0, int64_t c0,
                 int64_t c1) {
  constexpr int C = CodesPerUnit(BITS), UB = UnitBytes(BITS);
  constexpr int W = V::template Width<BITS, MR>();
  const int64_t k = s.k, n = s.n;
  const float* x = a.x + m0 * k;
  float masked[2][MR * C];
  for (int i = 0; i < g.ncut; ++i) {
    for (int m = 0; m < MR; ++m) {
      for (int j = 0; j < C; ++j) {
        int64_t r = g.cut[i] * C + j;
        masked[i][m * C + j] = (r >= g.r0 && r < g.r1) ? x[m * k + r] : 0.0f;
      }
    }
  }
  for (int64_t c = c0; c < c1; c += W) {
    Tile t;
    t.n = n;
    t.scale = g.scale ? g.scale + (c - c0) : nullptr;
    t.scale0 = g.scale0;
    t.out = a.out + m0 * n + c;
    t.out_rows = n;
    t.cols = static_cast<int>(Min(W, c1 - c));
    t.table = s.table;
    for (int i = 0; i < g.ncut; ++i) {
      t.codes = a.codes + g.cut[i] * UB * n + c;
      t.units = 1;
      t.x = masked[i];
      t.x_rows = C;
      V::template Run<BITS, MR, R>(t);
    }
    if (g.whole1 > g.whole0) {
      t.codes = a.codes + g.whole0 * UB * n + c;
      t.units = g.whole1 - g.whole0;
      t.x = x + g.whole0 * C;
      t.x_rows = k;
      V::template Run<BITS, MR, R>(t);
    }
  }
}

// Columns [c0, c1) of every row of the output.
template <class V, int BITS, int R>
void Columns(const Spec& s, const Matrix& a, int64_t c0, int64_t c1, float* buf) {
  constexpr int C = CodesPerUnit(BITS);
  const int64_t k = s.k, n = s.n;
  const int64_t block_rows = (k + s.nk - 1) / s.nk;
  constexpr int64_t UB = UnitBytes(BITS);
  const int64_t chunk = (kChunkRows + UB - 1) / UB * C;
  for (int64_t m = 0; m < a.m; ++m) {
    float* o = a.out + m * n;
    for (int64_t c = c0; c < c1; ++c) o[c] = 0.0f;
  }
  for (int64_t r0 = 0; r0 < k;) {
    const int64_t b = r0 / block_rows;
    Segment g;
    g.r0 = r0;
    g.r1 = Min(Min((b + 1) * block_rows, k), (r0 / chunk + 1) * chunk);
    BlockScales(s, a, b, c0, c1, buf, &g.scale, &g.scale0);
    g.whole0 = (g.r0 + C - 1) / C;
    g.whole1 = g.r1 / C;
    g.ncut = 0;
    if (g.whole0 > g.whole1) {
      g.cut[g.ncut++] = g.r0 / C;  // both ends in one unit
      g.whole1 = g.whole0;
    } else {
      if (g.r0 % C) g.cut[g.ncut++] = g.r0 / C;
      if (g.r1 % C) g.cut[g.ncut++] = g.whole1;
    }
    int64_t m0 = 0;
    for (; V::kMaxRows >= 4 && a.m - m0 >= 4; m0 += 4) {
      RowsSegment<V, BITS, (V::kMaxRows >= 4 ? 4 : 1), R>(s, a, g, m0, c0, c1);
    }
    for (; V::kMaxRows >= 2 && a.m - m0 >= 2; m0 += 2) {
      RowsSegment<V, BITS, (V::kMaxRows >= 2 ? 2 : 1), R>(s, a, g, m0, c0, c1);
    }
    for (; m0 < a.m; ++m0) RowsSegment<V, BITS, 1, R>(s, a, g, m0, c0, c1);
    r0 = g.r1;
  }
}

template <class V, int BITS>
void ColumnsOfWidth(const Spec& s, const Matrix& a, int64_t c0, int64_t c1,
                    float* buf) {
  switch (s.rounding) {
    case kRoundBF16:
      return Columns<V, BITS, kRoundBF16>(s, a, c0, c1, buf);
    case kRoundF16:
      return Columns<V, BITS, kRoundF16>(s, a, c0, c1, buf);
    default:
      return Columns<V, BITS, kRoundNone>(s, a, c0, c1, buf);
  }
}

// out[:, c0:c1] of one product; `buf` holds c1 - c0 floats.
template <class V>
void Product(const Spec& s, const Matrix& a, int64_t c0, int64_t c1, float* buf) {
  switch (s.bits) {
    case 2:
      return ColumnsOfWidth<V, 2>(s, a, c0, c1, buf);
    case 3:
      return ColumnsOfWidth<V, 3>(s, a, c0, c1, buf);
    case 4:
      return ColumnsOfWidth<V, 4>(s, a, c0, c1, buf);
    case 5:
      return ColumnsOfWidth<V, 5>(s, a, c0, c1, buf);
    case 6:
      return ColumnsOfWidth<V, 6>(s, a, c0, c1, buf);
    case 7:
      return ColumnsOfWidth<V, 7>(s, a, c0, c1, buf);
    default:
      return ColumnsOfWidth<V, 8>(s, a, c0, c1, buf);
  }
}

}  // namespace
}  // namespace pqjax

#endif  // PQJAX_NATIVE_DRIVER_H_
