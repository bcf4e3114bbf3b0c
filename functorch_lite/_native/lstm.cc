// The static LSTM core's two loops as XLA CPU custom calls (XLA's FFI).
//
// Why native code: XLA's CPU backend runs each step of a recurrent loop as
// 20-odd small kernels, 1-6 us each, around one small matmul, where PyTorch's
// oneDNN runs the whole LSTM as one primitive (bench/RESULTS.md). Here one
// call runs a whole loop. Per step and block of hidden units: the recurrent
// matmul with the block's weights packed to stay in L1 across rows, then the
// gates and the state update while the pre-activations are still in
// registers. Only the rows still running are computed (rows come sorted
// longest first), and rows, being independent sequences, are split between
// the calling thread and XLA's CPU thread pool with no synchronization
// between steps.
//
// The layout and the stored factors are those of `_lstm_forward` and
// `_lstm_reverse` in functorch_lite/_recurrent.py, which stay the reference
// (and the path for float64, other platforms and higher derivatives).
// Built at first use with the machine's C++ compiler (functorch_lite/_native/
// __init__.py) and -march=native: GCC's vector extensions give AVX-512 or
// AVX2 code from the same source.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <string>
#include <thread>

#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kW = 16;
#else
constexpr int kW = 8;
#endif
typedef float vf __attribute__((vector_size(kW * 4)));
typedef int32_t vi __attribute__((vector_size(kW * 4)));
constexpr int kRows = 4;  // rows per register block (the switches below)

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline vf splat(float s) { return vf{} + s; }
// A scalar from memory in every lane: one broadcast load (splat's scalar add
// and register broadcast take the port that the FMAs need).
inline vf bcast(const float* p) {
#if defined(__AVX512F__)
  return _mm512_set1_ps(*p);
#elif defined(__AVX__)
  return _mm256_set1_ps(*p);
#else
  return splat(*p);
#endif
}

// exp(x) for float32: x = n ln2 + r with |r| <= ln2 / 2, a degree-7 polynomial
// for exp(r) (the Cephes coefficients), and 2^n built in the exponent bits.
inline vf vexp(vf x) {
  // Clamped so that 2^n stays a normal float; a NaN fails both tests and
  // passes through (NaN in, NaN out, as in XLA).
  x = x > splat(88.3762626647949f) ? splat(88.3762626647949f) : x;
  x = x < splat(-87.3365447504f) ? splat(-87.3365447504f) : x;
  vf fx = x * 1.44269504088896341f + 0.5f;
  vi n = __builtin_convertvector(fx, vi);
  vf nf = __builtin_convertvector(n, vf);
  n = nf > fx ? n - 1 : n;  // floor
  nf = __builtin_convertvector(n, vf);
  vf r = x - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  vf y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  vi bits = (n + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}
inline vf vsigmoid(vf x) { return 1.0f / (1.0f + vexp(-x)); }
inline vf vtanh(vf x) { return 1.0f - 2.0f / (1.0f + vexp(x + x)); }

// Rows still running at step t: lengths are sorted longest first.
inline int64_t running(const int32_t* lengths, int64_t n, int64_t t) {
  int64_t lo = 0, hi = n;  // first row with length <= t
  while (lo < hi) {
    int64_t mid = (lo + hi) / 2;
    if (lengths[mid] > t) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// The gates' pre-activations of rows [r0, r0 + R) and hidden units
// [j, j + kW): the step's projection plus the bias plus h @ w_hh, into
// acc[row][gate]. Not inlined: inlined, GCC keeps the activations' constants
// in registers across this loop and spills accumulators instead.
template <int R>
__attribute__((noinline)) void gate_matmul(vf (&acc)[R][4], const float* pre,
                                           const float* bias, const float* wp,
                                           const float* hprev, int64_t r0,
                                           int64_t j, int64_t hid) {
  const int64_t g = 4 * hid;
  vf a[R][4];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 4; ++q)
      a[r][q] = load(pre + (r0 + r) * g + q * hid + j) + load(bias + q * hid + j);
  // wp: this block's weights, packed [kk][gate][lane] (pack_forward).
  for (int64_t kk = 0; kk < hid; ++kk) {
    const float* wk = wp + kk * 4 * kW;
    vf wv[4];
    for (int q = 0; q < 4; ++q) wv[q] = load(wk + q * kW);
    for (int r = 0; r < R; ++r) {
      vf hb = bcast(hprev + (r0 + r) * hid + kk);
      for (int q = 0; q < 4; ++q) a[r][q] += hb * wv[q];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 4; ++q) acc[r][q] = a[r][q];
}

// One forward step for rows [r0, r0 + R) and hidden units [j, j + kW).
template <int R, bool kStore>
inline void forward_block(const float* pre, const float* bias, const float* wp,
                          const float* hprev, float* c, float* y, float* hn,
                          float* k, float* tf, int64_t r0, int64_t j,
                          int64_t hid) {
  const int64_t g = 4 * hid;
  vf acc[R][4];
  gate_matmul<R>(acc, pre, bias, wp, hprev, r0, j, hid);
  for (int r = 0; r < R; ++r) {
    const int64_t row = r0 + r;
    vf gi = vsigmoid(acc[r][0]), gf = vsigmoid(acc[r][1]);
    vf gg = vtanh(acc[r][2]), go = vsigmoid(acc[r][3]);
    vf cold = load(c + row * hid + j);
    vf cnew = gf * cold + gi * gg;
    vf tc = vtanh(cnew);
    vf h = go * tc;
    store(c + row * hid + j, cnew);
    store(y + row * hid + j, h);
    store(hn + row * hid + j, h);
    if (kStore) {
      float* kr = k + row * g + j;
      store(kr, gg * gi * (1.0f - gi));
      store(kr + hid, cold * gf * (1.0f - gf));
      store(kr + 2 * hid, gi * (1.0f - gg * gg));
      store(kr + 3 * hid, tc * go * (1.0f - go));
      store(tf + row * 2 * hid + j, go * (1.0f - tc * tc));
      store(tf + row * 2 * hid + hid + j, gf);
    }
  }
}

// The columns of each block of kW hidden units, for the four gates, packed
// contiguously: [block][kk][gate][lane]. In w's own layout the rows of one
// block lie 4H floats apart, a power of two, and map to a few L1 sets only.
float* pack_forward(const float* w, int64_t hid) {
  const int64_t g = 4 * hid;
  float* wp = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * g * hid));
  if (wp == nullptr) return nullptr;
  for (int64_t j = 0; j < hid; j += kW)
    for (int64_t kk = 0; kk < hid; ++kk)
      for (int q = 0; q < 4; ++q)
        std::memcpy(wp + j * g + (kk * 4 + q) * kW, w + kk * g + q * hid + j,
                    sizeof(float) * kW);
  return wp;
}

// Rows are independent sequences, so the loops split them between threads
// with no synchronization: blocks of kRows rows are dealt to `chunks` chunks
// in a snake order (0 1 1 0 0 1 ...), so that each chunk gets rows of every
// length, and each chunk runs every step for its own rows.
inline bool in_chunk(int64_t block, int chunk, int chunks) {
  const int64_t round = block / chunks, pos = block % chunks;
  return (round % 2 ? chunks - 1 - pos : pos) == chunk;
}

// The forward loop for the rows of one chunk. hn and cn start as h0 and c0;
// wp is pack_forward's.
template <bool kStore>
void forward(const float* proj, const float* bias, const float* wp,
             const float* h0, const int32_t* lengths, int64_t t_len, int64_t n,
             int64_t hid, float* ys, float* hn, float* cn, float* k, float* tf,
             int chunk, int chunks) {
  const int64_t g = 4 * hid;
  for (int64_t t = 0; t < t_len; ++t) {
    const int64_t m = running(lengths, n, t);
    float* y = ys + t * n * hid;
    float* kt = kStore ? k + t * n * g : nullptr;
    float* tft = kStore ? tf + t * n * 2 * hid : nullptr;
    for (int64_t b = 0; b * kRows < n; ++b) {  // rows past their length
      if (!in_chunk(b, chunk, chunks)) continue;
      const int64_t r0 = b * kRows, r1 = std::min<int64_t>(r0 + kRows, n);
      const int64_t from = std::max<int64_t>(r0, std::min<int64_t>(m, r1));
      if (from == r1) continue;
      std::memset(y + from * hid, 0, sizeof(float) * (r1 - from) * hid);
      if (kStore) {
        // No gate gradients past a row's length: zero factors.
        std::memset(kt + from * g, 0, sizeof(float) * (r1 - from) * g);
        // [to_c, f] = [0, 1]: past its length a row's state gradients pass
        // through unchanged. The reverse kernel never reads these, but the
        // XLA reverse loop may (`_REVERSE`'s derivative, in a second
        // derivative whose tangents reach only the reverse pass).
        for (int64_t r = from; r < r1; ++r) {
          std::memset(tft + r * 2 * hid, 0, sizeof(float) * hid);
          std::fill(tft + r * 2 * hid + hid, tft + (r + 1) * 2 * hid, 1.0f);
        }
      }
    }
    if (m == 0) continue;
    const float* hprev = t ? ys + (t - 1) * n * hid : h0;
    const float* pre = proj + t * n * g;
    for (int64_t j = 0; j < hid; j += kW) {
      const float* w = wp + j * g;
      for (int64_t b = 0; b * kRows < m; ++b) {
        if (!in_chunk(b, chunk, chunks)) continue;
        const int64_t r0 = b * kRows;
        switch (std::min<int64_t>(kRows, m - r0)) {
          case 4: forward_block<4, kStore>(pre, bias, w, hprev, cn, y, hn, kt, tft, r0, j, hid); break;
          case 3: forward_block<3, kStore>(pre, bias, w, hprev, cn, y, hn, kt, tft, r0, j, hid); break;
          case 2: forward_block<2, kStore>(pre, bias, w, hprev, cn, y, hn, kt, tft, r0, j, hid); break;
          case 1: forward_block<1, kStore>(pre, bias, w, hprev, cn, y, hn, kt, tft, r0, j, hid); break;
        }
      }
    }
  }
}

// The reverse step's matmul dh = dg @ w^T, over a block of output columns
// [j, j + C kW) and a chunk of the 4H-long reduction [k0, k0 + kc): wt holds
// w^T's columns of the block packed [kk][C kW] (pack_reverse), so that one
// chunk of 128 rows is 32 KB and stays in L1 across the row blocks.
template <int R, int C>
inline void reverse_block(const float* dg, const float* wt, float* dh,
                          int64_t r0, int64_t j, int64_t k0, int64_t kc,
                          int64_t hid) {
  const int64_t g = 4 * hid;
  vf acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < C; ++q)
      acc[r][q] = k0 ? load(dh + (r0 + r) * hid + j + q * kW) : vf{};
  for (int64_t kk = k0; kk < k0 + kc; ++kk) {
    const float* wk = wt + kk * C * kW;
    vf wv[C];
    for (int q = 0; q < C; ++q) wv[q] = load(wk + q * kW);
    for (int r = 0; r < R; ++r) {
      vf d = bcast(dg + (r0 + r) * g + kk);
      for (int q = 0; q < C; ++q) acc[r][q] += d * wv[q];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < C; ++q) store(dh + (r0 + r) * hid + j + q * kW, acc[r][q]);
}

template <int C>
void reverse_cols(const float* dg, const float* wt, float* dh, int64_t m,
                  int64_t j, int64_t hid, int chunk, int chunks) {
  const int64_t g = 4 * hid;
  for (int64_t k0 = 0; k0 < g; k0 += 128) {
    const int64_t kc = std::min<int64_t>(128, g - k0);
    for (int64_t b = 0; b * kRows < m; ++b) {
      if (!in_chunk(b, chunk, chunks)) continue;
      const int64_t r0 = b * kRows;
      switch (std::min<int64_t>(kRows, m - r0)) {
        case 4: reverse_block<4, C>(dg, wt, dh, r0, j, k0, kc, hid); break;
        case 3: reverse_block<3, C>(dg, wt, dh, r0, j, k0, kc, hid); break;
        case 2: reverse_block<2, C>(dg, wt, dh, r0, j, k0, kc, hid); break;
        case 1: reverse_block<1, C>(dg, wt, dh, r0, j, k0, kc, hid); break;
      }
    }
  }
}

// w^T (4H, H), its columns in blocks of 4 kW (then kW) packed [kk][lane]:
// the block starting at column j begins at wt + j * 4H.
float* pack_reverse(const float* w, int64_t hid) {
  const int64_t g = 4 * hid;
  float* wt = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * g * hid));
  if (wt == nullptr) return nullptr;
  for (int64_t j = 0; j < hid;) {
    const int64_t width = j + 4 * kW <= hid ? 4 * kW : kW;
    for (int64_t kk = 0; kk < g; ++kk)
      for (int64_t c = 0; c < width; ++c)
        wt[j * g + kk * width + c] = w[(j + c) * g + kk];
    j += width;
  }
  return wt;
}

// The reverse loop for the rows of one chunk. dh and dc start as the final
// states' gradients; wt is pack_reverse's.
void reverse(float* d_proj, const float* tf, const float* wt, const float* d_ys,
             const int32_t* lengths, int64_t t_len, int64_t n, int64_t hid,
             float* dh, float* dc, int chunk, int chunks) {
  const int64_t g = 4 * hid;
  const int64_t last = running(lengths, n, 0) ? lengths[0] - 1 : -1;
  for (int64_t t = std::min<int64_t>(last, t_len - 1); t >= 0; --t) {
    const int64_t m = running(lengths, n, t);
    float* dg = d_proj + t * n * g;  // holds the factors k until overwritten
    const float* tft = tf + t * n * 2 * hid;
    const float* dy = d_ys + t * n * hid;
    for (int64_t r = 0; r < m; ++r) {
      if (!in_chunk(r / kRows, chunk, chunks)) continue;
      for (int64_t j = 0; j < hid; j += kW) {
        vf dh_all = load(dh + r * hid + j) + load(dy + r * hid + j);
        vf dc_all = load(dc + r * hid + j) + dh_all * load(tft + r * 2 * hid + j);
        float* kr = dg + r * g + j;
        store(kr, dc_all * load(kr));
        store(kr + hid, dc_all * load(kr + hid));
        store(kr + 2 * hid, dc_all * load(kr + 2 * hid));
        store(kr + 3 * hid, dh_all * load(kr + 3 * hid));
        store(dc + r * hid + j, dc_all * load(tft + r * 2 * hid + hid + j));
      }
    }
    for (int64_t j = 0; j < hid;) {
      if (j + 4 * kW <= hid) {
        reverse_cols<4>(dg, wt + j * g, dh, m, j, hid, chunk, chunks);
        j += 4 * kW;
      } else {
        reverse_cols<1>(dg, wt + j * g, dh, m, j, hid, chunk, chunks);
        j += kW;
      }
    }
  }
}

// Flush denormals to zero while a kernel runs, as XLA's CPU code does:
// gradients that fade through many steps reach the denormal range, where
// each multiply would take a microcode assist (2.3x slower reverse pass).
class FlushDenormals {
 public:
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
};

// The shapes the Python side promises (functorch_lite/_recurrent.py,
// `_native_forward` and `_native_reverse`), checked before any pointer
// arithmetic relies on them.
template <typename B>
bool shaped(const B& b, std::initializer_list<int64_t> dims) {
  auto d = b.dimensions();
  if (d.size() != dims.size()) return false;
  int64_t i = 0;
  for (int64_t v : dims)
    if (d[i++] != v) return false;
  return true;
}

ffi::Error bad_shapes(const char* what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                    std::string("functorch_lite LSTM kernel: ") + what);
}

ffi::Error check_hidden(int64_t hid) {
  if (hid % kW != 0)
    return bad_shapes("the hidden size must be a multiple of the vector width");
  return ffi::Error::Success();
}

ffi::Error out_of_memory() {
  return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                    "functorch_lite LSTM kernel: out of memory for the packed weights");
}

// Runs run(0), ..., run(chunks - 1) on the calling thread and XLA's CPU
// thread pool. Every thread claims chunks until none is left, so the call
// finishes even when no pool thread is free (the caller then runs them all);
// a task that starts after the call claims nothing.
template <typename F>
void parallel_chunks(ffi::ThreadPool& pool, int chunks, const F& run) {
  struct Shared {
    std::atomic<int> next{0}, done{0};
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, chunks, fn = &run] {
    FlushDenormals flush;
    for (int c; (c = shared->next.fetch_add(1)) < chunks;) {
      (*fn)(c);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int i = 1; i < chunks; ++i) pool.Schedule(decltype(work)(work));
  work();
  for (int spins = 0; shared->done.load(std::memory_order_acquire) < chunks; ++spins)
    if (spins > 1000) std::this_thread::yield(); else _mm_pause();
}

int chunks_for(ffi::ThreadPool& pool, int64_t n) {
  const int64_t blocks = (n + kRows - 1) / kRows;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), blocks)));
}

template <bool kStore>
ffi::Error forward_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> proj,
                        ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> w,
                        ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                        ffi::Buffer<ffi::S32> lengths, ffi::ResultBuffer<ffi::F32> ys,
                        ffi::ResultBuffer<ffi::F32> hn, ffi::ResultBuffer<ffi::F32> cn,
                        float* k, float* tf) {
  auto dims = proj.dimensions();
  if (dims.size() != 3 || dims[2] % 4) return bad_shapes("proj must be (T, N, 4H)");
  const int64_t t_len = dims[0], n = dims[1], hid = dims[2] / 4;
  if (!shaped(bias, {4 * hid}) || !shaped(w, {hid, 4 * hid}) ||
      !shaped(h0, {n, hid}) || !shaped(c0, {n, hid}) || !shaped(lengths, {n}) ||
      !shaped(*ys, {t_len, n, hid}) || !shaped(*hn, {n, hid}) || !shaped(*cn, {n, hid}))
    return bad_shapes("forward: inputs or results do not match proj (T, N, 4H)");
  if (auto e = check_hidden(hid); e.failure()) return e;
  std::memcpy(hn->typed_data(), h0.typed_data(), h0.size_bytes());
  std::memcpy(cn->typed_data(), c0.typed_data(), c0.size_bytes());
  float* wp = pack_forward(w.typed_data(), hid);
  if (wp == nullptr) return out_of_memory();
  const int chunks = chunks_for(pool, n);
  parallel_chunks(pool, chunks, [&](int chunk) {
    forward<kStore>(proj.typed_data(), bias.typed_data(), wp, h0.typed_data(),
                    lengths.typed_data(), t_len, n, hid, ys->typed_data(),
                    hn->typed_data(), cn->typed_data(), k, tf, chunk, chunks);
  });
  std::free(wp);
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> proj,
                   ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> w,
                   ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                   ffi::Buffer<ffi::S32> lengths, ffi::ResultBuffer<ffi::F32> ys,
                   ffi::ResultBuffer<ffi::F32> hn, ffi::ResultBuffer<ffi::F32> cn) {
  return forward_impl<false>(pool, proj, bias, w, h0, c0, lengths, ys, hn, cn,
                             nullptr, nullptr);
}

// `k`, the factors, is a buffer of its own: aliased to `proj`, it made XLA
// copy the projection first (0.6 ms of the 9.7 ms training step).
ffi::Error ForwardStore(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> proj,
                        ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> w,
                        ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                        ffi::Buffer<ffi::S32> lengths, ffi::ResultBuffer<ffi::F32> ys,
                        ffi::ResultBuffer<ffi::F32> hn, ffi::ResultBuffer<ffi::F32> cn,
                        ffi::ResultBuffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> tf) {
  auto d = proj.dimensions();
  if (d.size() != 3 || !shaped(*k, {d[0], d[1], d[2]}) ||
      !shaped(*tf, {d[0], d[1], d[2] / 2}))
    return bad_shapes("forward: k must be (T, N, 4H) and tf (T, N, 2H)");
  return forward_impl<true>(pool, proj, bias, w, h0, c0, lengths, ys, hn, cn,
                            k->typed_data(), tf->typed_data());
}

// `d_proj` aliases `k`: the gate gradients overwrite the factors.
ffi::Error Reverse(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> tf, ffi::Buffer<ffi::F32> w,
                   ffi::Buffer<ffi::F32> d_ys, ffi::Buffer<ffi::F32> d_hn,
                   ffi::Buffer<ffi::F32> d_cn, ffi::Buffer<ffi::S32> lengths,
                   ffi::ResultBuffer<ffi::F32> d_proj, ffi::ResultBuffer<ffi::F32> dh0,
                   ffi::ResultBuffer<ffi::F32> dc0) {
  auto dims = k.dimensions();
  if (dims.size() != 3 || dims[2] % 4) return bad_shapes("k must be (T, N, 4H)");
  const int64_t t_len = dims[0], n = dims[1], hid = dims[2] / 4;
  if (!shaped(tf, {t_len, n, 2 * hid}) || !shaped(w, {hid, 4 * hid}) ||
      !shaped(d_ys, {t_len, n, hid}) || !shaped(d_hn, {n, hid}) ||
      !shaped(d_cn, {n, hid}) || !shaped(lengths, {n}) ||
      !shaped(*d_proj, {t_len, n, 4 * hid}) || !shaped(*dh0, {n, hid}) ||
      !shaped(*dc0, {n, hid}))
    return bad_shapes("reverse: inputs or results do not match k (T, N, 4H)");
  if (auto e = check_hidden(hid); e.failure()) return e;
  if (d_proj->typed_data() != k.typed_data())
    std::memcpy(d_proj->typed_data(), k.typed_data(), k.size_bytes());
  std::memcpy(dh0->typed_data(), d_hn.typed_data(), d_hn.size_bytes());
  std::memcpy(dc0->typed_data(), d_cn.typed_data(), d_cn.size_bytes());
  float* wt = pack_reverse(w.typed_data(), hid);
  if (wt == nullptr) return out_of_memory();
  const int chunks = chunks_for(pool, n);
  parallel_chunks(pool, chunks, [&](int chunk) {
    reverse(d_proj->typed_data(), tf.typed_data(), wt, d_ys.typed_data(),
            lengths.typed_data(), t_len, n, hid, dh0->typed_data(),
            dc0->typed_data(), chunk, chunks);
  });
  std::free(wt);
  return ffi::Error::Success();
}

}  // namespace

#define FL_ARGS6                                                     \
  ffi::Ffi::Bind()                                                   \
      .Ctx<ffi::ThreadPool>()                                        \
      .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()     \
      .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()     \
      .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::S32>>()     \
      .Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()     \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlLstmForward, Forward, FL_ARGS6);
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlLstmForwardStore, ForwardStore,
                              FL_ARGS6.Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FlLstmReverse, Reverse,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>());
