/* The CPU kernels of the sparse decode (clt_forge/clt/native.py builds and calls them).

W_dec [F, P, D] packs each feature's decoders source-major: source l's row of feature f is the
(L - l) D floats at W + f P D + offsets[l] D, contiguous. z's active entries come as one CSR per
source layer; every pointer array below holds one entry per source layer.

clt_sparse_decode (the forward), one token at a time, its output row [L, D] staying in cache:
    out[t, l:] += z[t, l, f] W[f, l]      for every active (t, l, f), CSR z_l [B, F]

clt_sampled_grad_z (the backward's grad z where it is needed), one feature at a time, its
decoder row staying in cache:
    grad_z[l, t, f] = <W[f, l], grad_recon[t, l:]>      at the entries of a CSR pattern [F, B]

clt_decoder_adam (W_dec's Adam step after the backward), one feature at a time: for each source
l, the gradient of f's row is built in `scratch`, which stays in cache:
    g = coef[l, f] W[f, l]  +  sum over the nonzeros (f, t) of z_l^T: z[t, l, f] grad_recon[t, l:]
    g *= scale
and used at once by torch's Adam formula (no weight decay, amsgrad or maximize):
    m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
    W -= step_size m / (sqrt(v) / bias_correction2_sqrt + eps)
followed by the norm of the new row, norms[l, f] (the next forward's decoder norms). W_dec, its
moments and the norms are each read and written once per step; torch ops need four more passes
over W_dec-sized memory for the same (coef * W, the sparse product, the norms, the gradient).
m is float32 or bfloat16 (`m_bf16`: stored rounded to nearest even from the float32 value the
update used, as torch's `copy_` rounds).

Built by native.py with -O3 -march=native -fno-math-errno -fopenmp-simd (the simd pragmas only;
no OpenMP runtime): each caller thread runs a disjoint range of tokens or features. */

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t bits) {
    uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even; a NaN stays a NaN */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded);
}

/* One row segment: grad = (c w + part) scale (part NULL: no sparse part), Adam on w and its
   moments (m32: float32), and the sum of squares of the new w. Inlined at each call with a
   constant NULL or not, so each variant is its own vectorized loop. */
static inline __attribute__((always_inline)) float adam_row(
    float *restrict w, const float *restrict part, float *restrict m32, float *restrict sq, int64_t len,
    float c, float scale, float beta1, float beta2, float step_size, float inv_bc2, float eps)
{
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t i = 0; i < len; ++i) {
        const float grad = (part ? c * w[i] + part[i] : c * w[i]) * scale;
        const float a = m32[i] * beta1 + grad * (1.0f - beta1);
        const float s = sq[i] * beta2 + grad * grad * (1.0f - beta2);
        const float p = w[i] - step_size * a / (sqrtf(s) * inv_bc2 + eps);
        m32[i] = a;
        sq[i] = s;
        w[i] = p;
        total += p * p;
    }
    return total;
}

/* The same with m in bfloat16 (m16), its own function: folded into adam_row, gcc left the
   conversions unvectorized (3.5x slower at issue 18's shape). */
static inline __attribute__((always_inline)) float adam_row_bf16(
    float *restrict w, const float *restrict part, uint16_t *restrict m16, float *restrict sq, int64_t len,
    float c, float scale, float beta1, float beta2, float step_size, float inv_bc2, float eps)
{
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t i = 0; i < len; ++i) {
        const float grad = (part ? c * w[i] + part[i] : c * w[i]) * scale;
        const float a = bf16_to_float(m16[i]) * beta1 + grad * (1.0f - beta1);
        const float s = sq[i] * beta2 + grad * grad * (1.0f - beta2);
        const float p = w[i] - step_size * a / (sqrtf(s) * inv_bc2 + eps);
        m16[i] = float_to_bf16(a);
        sq[i] = s;
        w[i] = p;
        total += p * p;
    }
    return total;
}

#define STEP_ARGS scale, beta1, beta2, step_size, inv_bc2, eps

int clt_kernels_version(void) { return 2; }

void clt_sparse_decode(
    int64_t t_begin, int64_t t_end, int64_t n_layers, int64_t d_model,
    const int64_t *offsets,           /* [L + 1] W_dec's pair offsets */
    const float *W,                   /* [F, P, D] */
    const int64_t *const *crow,       /* z_l as CSR [B, F]: row starts [B + 1] per source */
    const int64_t *const *col,        /* its feature indices */
    const float *const *val,          /* its values */
    float *out)                       /* [B, L, D], zeroed */
{
    const int64_t row = offsets[n_layers] * d_model;
    const int64_t stride = n_layers * d_model;
    for (int64_t t = t_begin; t < t_end; ++t) {
        for (int64_t l = 0; l < n_layers; ++l) {
            const int64_t len = (n_layers - l) * d_model;
            float *restrict o = out + t * stride + l * d_model;
            for (int64_t j = crow[l][t]; j < crow[l][t + 1]; ++j) {
                const float a = val[l][j];
                const float *restrict w = W + col[l][j] * row + offsets[l] * d_model;
#pragma omp simd
                for (int64_t i = 0; i < len; ++i) o[i] += a * w[i];
            }
        }
    }
}

void clt_sampled_grad_z(
    int64_t f_begin, int64_t f_end, int64_t n_features, int64_t batch, int64_t n_layers, int64_t d_model,
    const int64_t *offsets,           /* [L + 1] */
    const float *W,                   /* [F, P, D] */
    const int64_t *const *crow,       /* the pattern as CSR [F, B] per source: row starts [F + 1]; NULL: skip l */
    const int64_t *const *col,        /* its token indices */
    const float *grad_recon,          /* [B, L, D] */
    float *grad_z)                    /* [L, B, F]: written at the pattern's entries only */
{
    const int64_t row = offsets[n_layers] * d_model;
    const int64_t stride = n_layers * d_model;
    for (int64_t f = f_begin; f < f_end; ++f) {
        for (int64_t l = 0; l < n_layers; ++l) {
            if (!crow[l]) continue;
            const int64_t len = (n_layers - l) * d_model;
            const float *restrict w = W + f * row + offsets[l] * d_model;
            for (int64_t j = crow[l][f]; j < crow[l][f + 1]; ++j) {
                const int64_t t = col[l][j];
                const float *restrict g = grad_recon + t * stride + l * d_model;
                float total = 0.0f;
#pragma omp simd reduction(+ : total)
                for (int64_t i = 0; i < len; ++i) total += w[i] * g[i];
                grad_z[(l * batch + t) * n_features + f] = total;
            }
        }
    }
}

void clt_decoder_adam(
    int64_t f_begin, int64_t f_end, int64_t n_features, int64_t n_layers, int64_t d_model,
    const int64_t *offsets,           /* [L + 1] W_dec's pair offsets */
    float *W,                         /* [F, P, D] */
    void *m, int m_bf16,              /* [F, P, D] float32 or bfloat16 */
    float *v,                         /* [F, P, D] */
    const float *coef,                /* [L, F], or NULL */
    const int64_t *const *crow,       /* z_l^T as CSR [F, B]: row starts [F + 1] per source */
    const int64_t *const *col,        /* its token indices */
    const float *const *val,          /* its values z[t, l, f] */
    const float *grad_recon,          /* [B, L, D], or NULL */
    float scale, float beta1, float beta2, float step_size, float bias_correction2_sqrt, float eps,
    float *norms,                     /* [L, F] out, or NULL */
    float *scratch)                   /* L D floats, this caller's own */
{
    const int64_t n_pairs = offsets[n_layers];
    const int64_t row = n_pairs * d_model;
    const int64_t stride = n_layers * d_model; /* grad_recon's token stride */
    const float inv_bc2 = 1.0f / bias_correction2_sqrt;
    for (int64_t f = f_begin; f < f_end; ++f) {
        for (int64_t l = 0; l < n_layers; ++l) {
            const int64_t start = f * row + offsets[l] * d_model;
            const int64_t len = (n_layers - l) * d_model;
            float *restrict w = W + start;
            float *restrict g = scratch;
            float *restrict sq = v + start;
            const float c = coef ? coef[l * n_features + f] : 0.0f;
            /* the sparse part in g (cache), then one pass over W, m, v: three streams from memory at once */
            const int64_t first = crow[l][f], last = grad_recon ? crow[l][f + 1] : first;
            for (int64_t j = first; j < last; ++j) {
                const float a = val[l][j];
                const float *restrict src = grad_recon + col[l][j] * stride + l * d_model;
                if (j == first) {
#pragma omp simd
                    for (int64_t i = 0; i < len; ++i) g[i] = a * src[i];
                } else {
#pragma omp simd
                    for (int64_t i = 0; i < len; ++i) g[i] += a * src[i];
                }
            }
            const float *restrict part = last > first ? g : NULL; /* no nonzero: g is stale, not read */
            float total = 0.0f;
            if (m_bf16 && part) total = adam_row_bf16(w, part, (uint16_t *)m + start, sq, len, c, STEP_ARGS);
            else if (m_bf16) total = adam_row_bf16(w, NULL, (uint16_t *)m + start, sq, len, c, STEP_ARGS);
            else if (part) total = adam_row(w, part, (float *)m + start, sq, len, c, STEP_ARGS);
            else total = adam_row(w, NULL, (float *)m + start, sq, len, c, STEP_ARGS);
            if (norms) norms[l * n_features + f] = sqrtf(total);
        }
    }
}
