#include <torch/extension.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "relaykern C++ core: paged KV pools and block managers";
}
