// pybind11 module rlfuse._C.  Each op family registers its functions from its own
// csrc/cpu/<family>_api.cpp; pointers arrive as integers (data_ptr() on the Python
// side), which validates shapes, dtypes and strides before any call.
#include <pybind11/pybind11.h>

#include <string>

#include "cpu/isa.h"

namespace py = pybind11;

// One line per op family.
void rlfuse_bind_logprob(py::module_& m);
void rlfuse_bind_advantage(py::module_& m);
void rlfuse_bind_policy_loss(py::module_& m);
void rlfuse_bind_preference(py::module_& m);
void rlfuse_bind_tree(py::module_& m);
void rlfuse_bind_kvpack(py::module_& m);
void rlfuse_bind_decode(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "rlfuse CPU kernels (raw-pointer interface; use rlfuse.ops instead)";
  m.def("active_isa", &rlfuse::cpu::active_isa, "The x86-64 ISA level the CPU kernels run at.");
  m.def("set_isa", [](const std::string& name) { return rlfuse::cpu::set_isa(name.c_str()); },
        py::arg("name"), "Force an ISA level; returns False if this CPU lacks it.");
  m.def("openmp", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  });

  rlfuse_bind_logprob(m);
  rlfuse_bind_advantage(m);
  rlfuse_bind_policy_loss(m);
  rlfuse_bind_preference(m);
  rlfuse_bind_tree(m);
  rlfuse_bind_kvpack(m);
  rlfuse_bind_decode(m);
}
