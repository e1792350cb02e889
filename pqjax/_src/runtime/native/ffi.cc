// The XLA FFI handler of the packed product, and the choice of instruction set.
//
// pqjax_matmul(x, codes, scale, column, table) -> out, attributes bits, k, rounding,
// level, threads. x is (*batch, M, K) float32, codes (*batch, packed rows, N), scale
// (*batch, NK, NC) float32, float16 or uint8, column (*batch, 1, NC) float32 (read
// only with uint8 scales), table (*batch, levels) float32, out (*batch, M, N)
// float32. Each batch axis of an operand is the output's or 1 (broadcast); where every
// weight operand is broadcast, the batch is folded into the rows of x.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "kernel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace pqjax {
namespace portable {
void Product(const Spec& s, const Matrix& a, int64_t c0, int64_t c1, float* buf);
}
#if defined(__x86_64__) || defined(_M_X64)
namespace avx2 {
void Product(const Spec& s, const Matrix& a, int64_t c0, int64_t c1, float* buf);
}
namespace avx512 {
void Product(const Spec& s, const Matrix& a, int64_t c0, int64_t c1, float* buf);
}
#endif

namespace {

// Bit i set: level i runs on this CPU.
int SupportedLevels() {
  int levels = 1 << kPortable;
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
              __builtin_cpu_supports("f16c");
  if (avx2) levels |= 1 << kAvx2;
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    levels |= 1 << kAvx512;
  }
#endif
  return levels;
}

const int kSupported = SupportedLevels();

using ProductFn = void (*)(const Spec&, const Matrix&, int64_t, int64_t, float*);

ProductFn ProductOf(int level) {
#if defined(__x86_64__) || defined(_M_X64)
  if (level == kAvx512) return avx512::Product;
  if (level == kAvx2) return avx2::Product;
#endif
  return portable::Product;
}

// A product runs on the calling thread below this many weights times tiles of 4 rows
// of x, and with one tile of rows below kThreadedRowWork weights. Measured on this
// 2-core machine (XLA's pool, medians): one row of 768 x 3072 took 0.13 ms on two
// threads against 0.10 on one; 16 rows of 1536 x 384 0.15 against 0.26, of 384 x
// 384 0.17 against 0.12; one row of 4096 x 4096 0.76 against 1.13.
constexpr int64_t kThreadedWork = int64_t(1) << 21;
constexpr int64_t kThreadedRowWork = int64_t(1) << 22;

// The work of one call, shared by the calling thread and the pool's tasks through a
// counter of items. Tasks may start late (after the call has returned): they hold it
// by a shared pointer and find no item left.
struct Work {
  Spec spec;
  std::vector<Matrix> products;
  // Items: every product cut into blocks of rows times blocks of columns.
  int64_t rows_per_item = 0, row_items = 1;
  int64_t columns_per_item = 0, column_items = 1;
  int64_t items = 0;
  ProductFn fn = nullptr;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void RunItems() {
    std::vector<float> scales(columns_per_item);
    for (;;) {
      int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= items) return;
      const int64_t per_product = row_items * column_items;
      Matrix a = products[i / per_product];
      const int64_t r0 = (i % per_product) / column_items * rows_per_item;
      const int64_t c0 = (i % column_items) * columns_per_item;
      a.x += r0 * spec.k;
      a.out += r0 * spec.n;
      a.m = std::min(a.m - r0, rows_per_item);
      fn(spec, a, c0, std::min(spec.n, c0 + columns_per_item), scales.data());
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// The levels, padded to 256 entries: at 2 to 4 bits entry i holds the level of
// i & (2^bits - 1), so lookups of 16 entries may ignore the next code's bits; the
// symmetric grid's last code, never stored, repeats the last level.
void PadTable(const float* table, int64_t levels, int bits, float* out) {
  int64_t codes = int64_t(1) << bits;
  for (int64_t i = 0; i < 256; ++i) {
    int64_t code = bits <= 4 ? (i & (codes - 1)) : std::min<int64_t>(i, codes - 1);
    out[i] = table[std::min(code, levels - 1)];
  }
}

int64_t Product(ffi::Span<const int64_t> dims, size_t from, size_t to) {
  int64_t p = 1;
  for (size_t i = from; i < to; ++i) p *= dims[i];
  return p;
}

ffi::Error Matmul(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer codes, ffi::AnyBuffer scale,
                  ffi::Buffer<ffi::F32> column, ffi::Buffer<ffi::F32> table,
                  ffi::ResultBuffer<ffi::F32> out, ffi::ThreadPool pool, int64_t bits,
                  int64_t k, int64_t rounding, int64_t level, int64_t threads) {
  if (bits < 2 || bits > 8) return ffi::Error::InvalidArgument("bits must be 2..8");
  if (level < 0 || level > kAvx512 || !(kSupported & (1 << level))) {
    return ffi::Error::InvalidArgument("this CPU cannot run level " + std::to_string(level));
  }
  if (rounding < kRoundNone || rounding > kRoundF16) {
    return ffi::Error::InvalidArgument("unknown rounding");
  }
  auto xd = x.dimensions(), cd = codes.dimensions(), sd = scale.dimensions();
  auto od = out->dimensions(), td = table.dimensions(), vd = column.dimensions();
  size_t nb = xd.size() - 2;
  if (xd.size() < 2 || cd.size() != nb + 2 || sd.size() != nb + 2 || vd.size() != nb + 2 ||
      td.size() != nb + 1 || od.size() != nb + 2) {
    return ffi::Error::InvalidArgument("operands of inconsistent ranks");
  }
  const int64_t m = xd[nb], n = cd[nb + 1], nk = sd[nb], nc = sd[nb + 1];
  const int64_t levels = td[nb];
  const int64_t c = CodesPerUnit(int(bits)), ub = UnitBytes(int(bits));
  if (xd[nb + 1] != k || cd[nb] != (k + c - 1) / c * ub || od[nb] != m ||
      od[nb + 1] != n || nk < 1 || (nc != 1 && nc != n) ||
      (levels != (int64_t(1) << bits) && levels != (int64_t(1) << bits) - 1)) {
    return ffi::Error::InvalidArgument("operand shapes do not describe one packed product");
  }
  const auto ctype = codes.element_type(), stype = scale.element_type();
  if (ctype != (bits == 8 ? ffi::DataType::S8 : ffi::DataType::U8)) {
    return ffi::Error::InvalidArgument("codes must be uint8 (int8 at 8 bits)");
  }
  int scale_kind;
  if (stype == ffi::DataType::F32) {
    scale_kind = kScaleF32;
  } else if (stype == ffi::DataType::F16) {
    scale_kind = kScaleF16;
  } else if (stype == ffi::DataType::U8) {
    scale_kind = kScaleU8;
    if (vd[nb] != 1 || vd[nb + 1] != nc) {
      return ffi::Error::InvalidArgument("column scales must be (1, NC)");
    }
  } else {
    return ffi::Error::InvalidArgument("scales must be float32, float16 or uint8");
  }
  // Batch axes: the output's, each operand's equal to it or 1.
  const int64_t batch = Product(od, 0, nb);
  bool weights_broadcast = true;
  for (size_t i = 0; i < nb; ++i) {
    for (int64_t d : {xd[i], cd[i], sd[i], vd[i], td[i]}) {
      if (d != od[i] && d != 1) {
        return ffi::Error::InvalidArgument("batch axes do not broadcast");
      }
    }
    if (cd[i] != 1 || sd[i] != 1 || vd[i] != 1 || td[i] != 1) weights_broadcast = false;
    if (xd[i] != od[i]) weights_broadcast = false;
  }
  if (batch == 0 || m == 0 || n == 0) return ffi::Error::Success();
  float* y = out->typed_data();
  if (k == 0) {
    std::fill(y, y + batch * m * n, 0.0f);
    return ffi::Error::Success();
  }

  auto work = std::make_shared<Work>();
  const uint8_t* code_data = static_cast<const uint8_t*>(codes.untyped_data());
  const uint8_t* scale_data = static_cast<const uint8_t*>(scale.untyped_data());
  const size_t scale_bytes = scale_kind == kScaleF32 ? 4 : scale_kind == kScaleF16 ? 2 : 1;
  // One padded table per distinct table operand.
  const int64_t ntables = Product(td, 0, nb);
  std::vector<float> tables(size_t(ntables) * 256);
  for (int64_t i = 0; i < ntables; ++i) {
    PadTable(table.typed_data() + i * levels, levels, int(bits), &tables[i * 256]);
  }
  const int64_t zero = bits == 8 ? levels / 2 : 0;  // an int8 code q is index q + zero
  work->spec = Spec{int(bits), k, n, nk, nc, scale_kind, int(rounding), nullptr};
  // The offset of batch element b in an operand of batch axes `d` (1 = broadcast).
  auto offset = [&](ffi::Span<const int64_t> d, int64_t b) {
    int64_t off = 0, stride = 1;
    for (size_t i = nb; i-- > 0;) {
      int64_t index = b % od[i];
      b /= od[i];
      if (d[i] != 1) off += index * stride;
      stride *= d[i];
    }
    return off;
  };
  std::vector<const float*> table_of;
  if (weights_broadcast) {
    work->products.push_back(Matrix{x.typed_data(), code_data, scale_data,
                                    column.typed_data(), y, batch * m});
    table_of.push_back(&tables[0]);
  } else {
    for (int64_t b = 0; b < batch; ++b) {
      work->products.push_back(Matrix{
          x.typed_data() + offset(xd, b) * m * k,
          code_data + offset(cd, b) * cd[nb] * n,
          scale_data + offset(sd, b) * nk * nc * scale_bytes,
          column.typed_data() + offset(vd, b) * vd[nb + 1],
          y + b * m * n,
          m,
      });
      table_of.push_back(&tables[offset(td, b) * 256]);
    }
  }
  // Tables differ between batch elements only with batched weights: the spec's table
  // is then set per product by running products with their own spec.
  bool one_table = true;
  for (const float* t : table_of) one_table = one_table && t == table_of[0];
  work->spec.table = table_of[0] + zero;
  work->fn = ProductOf(int(level));
  if (!one_table) {
    // Batched weights: one product at a time, each with its own table.
    std::vector<float> scales(n);
    for (size_t b = 0; b < work->products.size(); ++b) {
      Spec s = work->spec;
      s.table = table_of[b] + zero;
      work->fn(s, work->products[b], 0, n, scales.data());
    }
    return ffi::Error::Success();
  }

  const int64_t m_rows = work->products[0].m;
  const int64_t row_tiles = (m_rows + 3) / 4;
  const int64_t count = int64_t(work->products.size());
  const int64_t effort = k * n * row_tiles * count;
  const int64_t aligned = (n + kItemAlign - 1) / kItemAlign;
  int64_t helpers = threads > 0 ? threads - 1 : pool.num_threads();
  if (threads <= 0 &&
      (effort < kThreadedWork || (row_tiles < 2 && effort < kThreadedRowWork))) {
    helpers = 0;
  }
  helpers = std::min<int64_t>({helpers, pool.num_threads(), count * aligned * row_tiles - 1});
  const int64_t parts = helpers + 1;
  // Threads share rows where there are several tiles of them (each thread reads the
  // codes of every column, but they stay in the shared cache), else columns: two
  // items a thread, each a run of whole aligned blocks. Neither changes any sum.
  work->row_items = row_tiles >= 2 * parts ? parts : 1;
  work->rows_per_item = (row_tiles + work->row_items - 1) / work->row_items * 4;
  work->row_items = (m_rows + work->rows_per_item - 1) / work->rows_per_item;
  const int64_t column_parts = work->row_items > 1 ? 1 : std::min<int64_t>(aligned, 2 * parts);
  work->columns_per_item = (aligned + column_parts - 1) / column_parts * kItemAlign;
  work->column_items = (n + work->columns_per_item - 1) / work->columns_per_item;
  work->items = count * work->row_items * work->column_items;
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([work] { work->RunItems(); });
  }
  work->RunItems();
  while (work->done.load(std::memory_order_acquire) < work->items) {
    std::this_thread::yield();
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace pqjax

// The library is built with hidden visibility: what Python loads is exported here.
#define PQJAX_EXPORT extern "C" __attribute__((visibility("default")))

PQJAX_EXPORT XLA_FFI_Error* pqjax_matmul(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(pqjax_matmul, pqjax::Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("rounding")
                                  .Attr<int64_t>("level")
                                  .Attr<int64_t>("threads"));

#ifndef PQJAX_JAXLIB_VERSION
#define PQJAX_JAXLIB_VERSION "unknown"
#endif

// What Python checks before registering the handler.
PQJAX_EXPORT int pqjax_native_levels() { return pqjax::kSupported; }
PQJAX_EXPORT const char* pqjax_native_jaxlib() { return PQJAX_JAXLIB_VERSION; }
