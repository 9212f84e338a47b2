// Shared by every kernel file (they are joined into one translation unit, in cpu_kernels._SOURCE_FILES order).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <algorithm>
#include <cmath>
#include <numeric>
#include <type_traits>
#include <vector>
// x86-64 with GCC: the AVX-512 kernels are compiled (in a target region) and chosen at run time
#if defined(__x86_64__) && defined(__GNUC__)
#define EXPERTMESH_AVX512 1
#include <immintrin.h>
#endif

// Each eager op rounds its result to the tensor's dtype: rnd<T> does the same here (BF16 rounds
// to nearest even, as c10::BFloat16 does), so a chain of them gives the eager values.
template <typename T> inline float rnd(float v) { return static_cast<float>(static_cast<T>(v)); }

// Whether this CPU runs the AVX-512 kernels (compiled in `#pragma GCC target` regions whatever the
// build machine, so chosen here at run time).
bool avx512_supported() {
#ifdef EXPERTMESH_AVX512
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

