// The portable tiles: plain C++ for any CPU (the compiler vectorises what it can).
#include <cstdint>

#include "driver.h"
#include "kernel.h"

namespace pqjax {
namespace {

struct Portable {
  static constexpr int kMaxRows = 4;

  template <int BITS, int MR>
  static constexpr int Width() {
    return kScalarWidth;
  }

  template <int BITS, int MR, int R>
  static void Run(const Tile& t) {
    ScalarTile<BITS, MR, R>(t);
  }
};

}  // namespace

namespace portable {
void Product(const Spec& s, const Matrix& a, int64_t c0, int64_t c1, float* buf) {
  pqjax::Product<Portable>(s, a, c0, c1, buf);
}
}  // namespace portable
}  // namespace pqjax
