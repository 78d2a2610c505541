// Multi-scale deformable attention on the CPU as XLA FFI custom calls.
//
// Same semantics as mtaclip_jax/models/ops/deform_attn.py's ms_deform_attn_gather
// (grid_sample: bilinear, zero padding, align_corners=False, so
// pixel = loc * size - 0.5; out-of-map corners weigh 0), without the gather's
// [B, H, Lq, L*P*4, Dh] intermediate: each sample reads its corners' rows of
// `value` and accumulates straight into the output (forward) or into d_value
// (backward). Work is split over (batch, head) slices, which own disjoint parts
// of every output, so the threads never write to the same memory.
//
// Layouts (row-major, fp32): value [B, S, H, Dh], loc [B, Lq, H, L, P, 2]
// (x, y), attn [B, Lq, H, L, P], out [B, Lq, H, Dh]; attribute spatial_shapes
// = (h0, w0, h1, w1, ...). Built by deform_attn_cpu.py with -ffp-contract=off
// so the pixel coordinates round exactly as XLA's.

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t batch, positions, heads, channels, queries, levels, points;
  std::vector<int64_t> height, width, start;
};

std::string DimsString(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    s += (i ? ", " : "") + std::to_string(dims[i]);
  }
  return s + "]";
}

// Reads the sizes from value and loc and checks every input against them.
ffi::Error MakeGeometry(ffi::Span<const int64_t> value_dims,
                        ffi::Span<const int64_t> loc_dims,
                        ffi::Span<const int64_t> attn_dims,
                        ffi::Span<const int64_t> shapes, Geometry* g) {
  if (value_dims.size() != 4 || loc_dims.size() != 6 || attn_dims.size() != 5) {
    return ffi::Error::InvalidArgument(
        "ms_deform_attn_cpu: expected value [B,S,H,Dh], loc [B,Lq,H,L,P,2], "
        "attn [B,Lq,H,L,P]; got value " + DimsString(value_dims) + ", loc " +
        DimsString(loc_dims) + ", attn " + DimsString(attn_dims));
  }
  g->batch = value_dims[0];
  g->positions = value_dims[1];
  g->heads = value_dims[2];
  g->channels = value_dims[3];
  g->queries = loc_dims[1];
  g->levels = loc_dims[3];
  g->points = loc_dims[4];
  bool ok = loc_dims[0] == g->batch && loc_dims[2] == g->heads && loc_dims[5] == 2;
  for (int i = 0; i < 5; ++i) ok = ok && attn_dims[i] == loc_dims[i];
  if (!ok) {
    return ffi::Error::InvalidArgument(
        "ms_deform_attn_cpu: inconsistent shapes value " + DimsString(value_dims) +
        ", loc " + DimsString(loc_dims) + ", attn " + DimsString(attn_dims));
  }
  if (static_cast<int64_t>(shapes.size()) != 2 * g->levels) {
    return ffi::Error::InvalidArgument(
        "ms_deform_attn_cpu: spatial_shapes holds " + std::to_string(shapes.size()) +
        " numbers, expected 2 per level for " + std::to_string(g->levels) + " levels");
  }
  int64_t total = 0;
  for (int64_t l = 0; l < g->levels; ++l) {
    g->height.push_back(shapes[2 * l]);
    g->width.push_back(shapes[2 * l + 1]);
    g->start.push_back(total);
    total += shapes[2 * l] * shapes[2 * l + 1];
  }
  if (total != g->positions) {
    return ffi::Error::InvalidArgument(
        "ms_deform_attn_cpu: spatial_shapes hold " + std::to_string(total) +
        " positions but value has " + std::to_string(g->positions));
  }
  return ffi::Error::Success();
}

int NumThreads() {
  static const int count = [] {
    int n = static_cast<int>(std::thread::hardware_concurrency());
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
      n = n > 0 ? std::min(n, CPU_COUNT(&set)) : CPU_COUNT(&set);
    }
    if (const char* cap = std::getenv("MTACLIP_DEFORM_THREADS")) {
      int c = std::atoi(cap);
      if (c > 0) n = std::min(n, c);
    }
    return std::max(n, 1);
  }();
  return count;
}

// Calls fn(i) for i in [0, n) on up to NumThreads() threads.
template <typename Fn>
void ParallelFor(int64_t n, const Fn& fn) {
  const int64_t threads = std::min<int64_t>(NumThreads(), n);
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  auto work = [&] {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
}

// The 4 bilinear corners of one sample, in the reference's order
// (dy, dx) = (0,0), (0,1), (1,0), (1,1). Outside corners have inside = false.
struct Corners {
  float fx, fy;
  int64_t row[4];  // position in the flattened value maps
  float wy[4], wx[4];
  bool inside[4];
};

inline void MakeCorners(float lx, float ly, int64_t h, int64_t w, int64_t start,
                        Corners* c) {
  const float x = lx * static_cast<float>(w) - 0.5f;
  const float y = ly * static_cast<float>(h) - 0.5f;
  const float x0 = std::floor(x);
  const float y0 = std::floor(y);
  c->fx = x - x0;
  c->fy = y - y0;
  for (int k = 0; k < 4; ++k) {
    const int dy = k >> 1, dx = k & 1;
    // Compare in float: the corner index may not fit an integer (or be NaN,
    // which compares false, so NaN samples contribute nothing, as in XLA).
    const float xi = x0 + dx, yi = y0 + dy;
    c->inside[k] = xi >= 0.0f && xi < static_cast<float>(w) && yi >= 0.0f &&
                   yi < static_cast<float>(h);
    c->row[k] = c->inside[k]
                    ? start + static_cast<int64_t>(yi) * w + static_cast<int64_t>(xi)
                    : 0;
    c->wy[k] = dy ? c->fy : 1.0f - c->fy;
    c->wx[k] = dx ? c->fx : 1.0f - c->fx;
  }
}

// Runs body(q, l, p, corners, a) for every sample of slice (b, h), queries
// [q_begin, q_end).
template <typename Body>
inline void ForEachSample(const Geometry& g, const float* loc, const float* attn,
                          int64_t b, int64_t h, int64_t q_begin, int64_t q_end,
                          const Body& body) {
  const int64_t lp = g.levels * g.points;
  Corners c;
  for (int64_t q = q_begin; q < q_end; ++q) {
    const int64_t sample0 = ((b * g.queries + q) * g.heads + h) * lp;
    for (int64_t l = 0; l < g.levels; ++l) {
      for (int64_t p = 0; p < g.points; ++p) {
        const int64_t i = sample0 + l * g.points + p;
        MakeCorners(loc[2 * i], loc[2 * i + 1], g.height[l], g.width[l], g.start[l], &c);
        body(q, l, i, c, attn[i]);
      }
    }
  }
}

constexpr int64_t kForwardQueryChunk = 256;

ffi::Error Forward(ffi::Buffer<ffi::F32> value, ffi::Buffer<ffi::F32> loc,
                   ffi::Buffer<ffi::F32> attn, ffi::Span<const int64_t> shapes,
                   ffi::ResultBuffer<ffi::F32> out) {
  Geometry g;
  ffi::Error err = MakeGeometry(value.dimensions(), loc.dimensions(),
                                attn.dimensions(), shapes, &g);
  if (err.failure()) return err;
  const float* v = value.typed_data();
  const float* lc = loc.typed_data();
  const float* at = attn.typed_data();
  float* o = out->typed_data();
  const int64_t dh = g.channels, row_stride = g.heads * dh;
  const int64_t chunks = (g.queries + kForwardQueryChunk - 1) / kForwardQueryChunk;
  // Items (b, h, query chunk): each writes only out[b, chunk, h, :].
  ParallelFor(g.batch * g.heads * chunks, [&](int64_t item) {
    const int64_t bh = item / chunks, chunk = item % chunks;
    const int64_t b = bh / g.heads, h = bh % g.heads;
    const int64_t q_begin = chunk * kForwardQueryChunk;
    const int64_t q_end = std::min(g.queries, q_begin + kForwardQueryChunk);
    const float* v_bh = v + b * g.positions * row_stride + h * dh;
    for (int64_t q = q_begin; q < q_end; ++q) {
      std::fill_n(o + ((b * g.queries + q) * g.heads + h) * dh, dh, 0.0f);
    }
    ForEachSample(g, lc, at, b, h, q_begin, q_end,
                  [&](int64_t q, int64_t, int64_t, const Corners& c, float a) {
      float* o_q = o + ((b * g.queries + q) * g.heads + h) * dh;
      for (int k = 0; k < 4; ++k) {
        if (!c.inside[k]) continue;
        const float w = c.wy[k] * c.wx[k] * a;
        const float* v_row = v_bh + c.row[k] * row_stride;
        for (int64_t d = 0; d < dh; ++d) o_q[d] += w * v_row[d];
      }
    });
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::Buffer<ffi::F32> value, ffi::Buffer<ffi::F32> loc,
                    ffi::Buffer<ffi::F32> attn, ffi::Buffer<ffi::F32> grad_out,
                    ffi::Span<const int64_t> shapes,
                    ffi::ResultBuffer<ffi::F32> d_value,
                    ffi::ResultBuffer<ffi::F32> d_loc,
                    ffi::ResultBuffer<ffi::F32> d_attn) {
  Geometry g;
  ffi::Error err = MakeGeometry(value.dimensions(), loc.dimensions(),
                                attn.dimensions(), shapes, &g);
  if (err.failure()) return err;
  const float* v = value.typed_data();
  const float* lc = loc.typed_data();
  const float* at = attn.typed_data();
  const float* go = grad_out.typed_data();
  float* dv = d_value->typed_data();
  float* dl = d_loc->typed_data();
  float* da = d_attn->typed_data();
  const int64_t dh = g.channels, row_stride = g.heads * dh;
  // Items (b, h): d_value[b, :, h, :] is scattered to by every query of the
  // slice, so a slice is not split further; d_loc / d_attn of (b, q, h) are
  // written by their slice only.
  ParallelFor(g.batch * g.heads, [&](int64_t bh) {
    const int64_t b = bh / g.heads, h = bh % g.heads;
    const float* v_bh = v + b * g.positions * row_stride + h * dh;
    float* dv_bh = dv + b * g.positions * row_stride + h * dh;
    for (int64_t s = 0; s < g.positions; ++s) std::fill_n(dv_bh + s * row_stride, dh, 0.0f);
    ForEachSample(g, lc, at, b, h, 0, g.queries,
                  [&](int64_t q, int64_t l, int64_t i, const Corners& c, float a) {
      const float* g_q = go + ((b * g.queries + q) * g.heads + h) * dh;
      float d_fx = 0.0f, d_fy = 0.0f, d_a = 0.0f;
      for (int k = 0; k < 4; ++k) {
        if (!c.inside[k]) continue;
        const float* v_row = v_bh + c.row[k] * row_stride;
        float* dv_row = dv_bh + c.row[k] * row_stride;
        const float wywx = c.wy[k] * c.wx[k];
        const float w = wywx * a;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < dh; ++d) {
          dot += v_row[d] * g_q[d];
          dv_row[d] += w * g_q[d];
        }
        // d(wy * wx * a): wx = 1 - fx (dx = 0) or fx (dx = 1); same for y.
        d_a += wywx * dot;
        const float d_wx = c.wy[k] * a * dot, d_wy = c.wx[k] * a * dot;
        d_fx += (k & 1) ? d_wx : -d_wx;
        d_fy += (k >> 1) ? d_wy : -d_wy;
      }
      // fx = x - floor(x) and x = loc_x * W - 0.5: floor has no gradient.
      dl[2 * i] = d_fx * static_cast<float>(g.width[l]);
      dl[2 * i + 1] = d_fy * static_cast<float>(g.height[l]);
      da[i] = d_a;
    });
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MsDeformAttnForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("spatial_shapes")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MsDeformAttnBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("spatial_shapes")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
