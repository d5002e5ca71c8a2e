// Storage pins: while an asynchronous operation reads or writes a tensor, its storage must
// not move.  Holding a reference keeps a storage alive, but resize_() reallocates a storage
// in place and frees the old memory under the operation's feet (a crash, or bytes written
// into someone else's tensor).  So a pinned storage is made non-resizable: resize_() then
// raises torch's "Trying to resize storage that is not resizable" instead.  set_() swaps
// the tensor's storage instead of changing it; the Work notices that afterwards.
#include <torch/python.h>

#include <mutex>
#include <unordered_map>

namespace pycomm {

namespace {

struct Pin {
  int count = 0;
  bool wasResizable = false;
};
std::mutex mu;
std::unordered_map<c10::StorageImpl*, Pin> pins;

}  // namespace

void pinStorage(const at::Tensor& t) {
  if (!t.has_storage()) return;
  c10::StorageImpl* s = t.storage().unsafeGetStorageImpl();
  std::lock_guard<std::mutex> lock(mu);
  Pin& p = pins[s];
  if (p.count++ == 0) {
    p.wasResizable = s->resizable();
    s->set_resizable(false);
  }
}

void unpinStorage(const at::Tensor& t) {
  if (!t.has_storage()) return;
  c10::StorageImpl* s = t.storage().unsafeGetStorageImpl();
  std::lock_guard<std::mutex> lock(mu);
  auto it = pins.find(s);
  if (it == pins.end()) return;
  if (--it->second.count == 0) {
    s->set_resizable(it->second.wasResizable);
    pins.erase(it);
  }
}

void bindStorage(pybind11::module_& m) {
  m.def("pin_storage", &pinStorage, pybind11::arg("tensor"),
        "makes the tensor's storage non-resizable until unpin_storage (counted)");
  m.def("unpin_storage", &unpinStorage, pybind11::arg("tensor"));
}

}  // namespace pycomm
