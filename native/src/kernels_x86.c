/* x86-64 kernels: AVX2 (maddubs) and AVX-VNNI (vpdpbusd), one body (kernels_x86_body.h). */
#if defined(__x86_64__)
#include <immintrin.h>

#include "ternary.h"

#define PREFETCH_AHEAD 2048 /* bytes of weights ahead of the decode */

#define KNAME "avx2"
#define KSUFFIX avx2
#define KTARGET "avx2,fma"
__attribute__((target("avx2"))) static inline __m256i dot_avx2(__m256i acc, __m256i u, __m256i s) {
  /* u8 digits (<= 2) x s8: pair sums fit int16 without saturation */
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
#define KDOT dot_avx2
#include "kernels_x86_body.h"
#undef KNAME
#undef KSUFFIX
#undef KTARGET
#undef KDOT

#define KNAME "avxvnni"
#define KSUFFIX avxvnni
#define KTARGET "avx2,fma,avxvnni"
#define KDOT _mm256_dpbusd_avx_epi32
#include "kernels_x86_body.h"
#endif

