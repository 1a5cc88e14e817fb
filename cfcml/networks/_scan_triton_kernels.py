"""Triton kernels of the fused Mamba-1 selective scan (the `triton` backend; cfcml/networks/scan_triton.py).

Do not import this module directly: `scan_triton` loads it twice, once compiled (CUDA) and once under
Triton's interpreter (CPU tensors, `TRITON_INTERPRET=1`), because `triton.jit` picks its flavour when
a kernel is defined. Layouts: u, delta, z, out [B, D, L]; A [D, N]; B, C [B, N, L]; D, delta_bias [D];
every tensor is read through its own strides. The maths (per sequence b, channel d, state n):

    dt[t] = softplus(delta[t] + delta_bias),  a[t] = exp(dt[t] A),  b[t] = dt[t] B[t] u[t]
    h[t] = a[t] h[t-1] + b[t]                 (reverse: h[t] = a[t] h[t+1] + b[t])
    out[t] = (sum_n C[t] h[t] + D u[t]) * silu(z[t])

Each program owns one sequence and BD channels and walks the sequence in tiles of T tokens, carrying
the state h [BD, N] (fp32) in registers between tiles. Inside a tile the recurrence is one
`tl.associative_scan` over the pairs (a, b) with (a1, b1) o (a2, b2) = (a1 a2, b1 a2 + b2).

Scan order: the kernels index a tile by its *scan order* j = 0..T-1: position k T + j forwards, and
k T + T - 1 - j in reverse (tiles walked from the end). So the reverse scan loads the tile in
descending positions and scans forwards along j, with no flipped copy of any input.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # a constexpr: compiled kernels may read no other globals


@triton.jit
def _combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _sum(x, axis: tl.constexpr):
    # tl.reduce with our own combine rather than tl.sum (same code on the GPU): tl.sum, tl.sigmoid and
    # tl.zeros are @jit functions of Triton's standard library, whose flavour (compiled or interpreted)
    # was fixed when triton was imported; these kernels use only builtins and their own helpers, so
    # their interpreted flavour works whatever TRITON_INTERPRET was at that import.
    return tl.reduce(x, axis, _add)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _softplus(x):
    # torch's softplus with its threshold 20 (above it softplus(x) == x in float32)
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))), x)


@triton.jit
def _positions(k, j, REVERSE: tl.constexpr, T: tl.constexpr):
    # sequence positions of scan-order slots j of tile k
    if REVERSE:
        t = k * T + (T - 1 - j)
    else:
        t = k * T + j
    return t


@triton.jit
def selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, states_ptr,
    Dm, N, L, n_tiles: tl.constexpr,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_Ad, s_An, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl,
    s_zb, s_zd, s_zl, s_ob, s_od, s_ol, s_sb, s_sd, s_sn, s_sk,
    REVERSE: tl.constexpr, NP: tl.constexpr, T: tl.constexpr, BD: tl.constexpr,
):
    """out [B, D, L] in out's dtype; states[b, d, n, k] (fp32): the state before tile k in scan order."""
    pid_b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    n = tl.arange(0, NP)
    j = tl.arange(0, T)
    dmask = d < Dm
    nmask = n < N
    dn_mask = dmask[:, None] & nmask[None, :]
    # exp(dt A) = exp2(dt A log2 e): log2(e) folded into A once (exp2 is the cheaper instruction)
    A2 = tl.load(A_ptr + d[:, None] * s_Ad + n[None, :] * s_An, mask=dn_mask, other=0.0).to(tl.float32) * LOG2E
    Dskip = tl.load(D_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    h = tl.full([BD, NP], 0.0, tl.float32)
    for i in range(n_tiles):
        if REVERSE:
            k = n_tiles - 1 - i
        else:
            k = i
        tl.store(states_ptr + pid_b * s_sb + d[:, None] * s_sd + n[None, :] * s_sn + k * s_sk, h, mask=dn_mask)
        t = _positions(k, j, REVERSE, T)
        tmask = t < L
        m2 = dmask[:, None] & tmask[None, :]
        nt_mask = nmask[:, None] & tmask[None, :]
        u = tl.load(u_ptr + pid_b * s_ub + d[:, None] * s_ud + t[None, :] * s_ul, mask=m2, other=0.0).to(tl.float32)
        dl = tl.load(delta_ptr + pid_b * s_db + d[:, None] * s_dd + t[None, :] * s_dl, mask=m2,
                     other=0.0).to(tl.float32)
        zz = tl.load(z_ptr + pid_b * s_zb + d[:, None] * s_zd + t[None, :] * s_zl, mask=m2, other=0.0).to(tl.float32)
        Bt = tl.load(B_ptr + pid_b * s_Bb + n[:, None] * s_Bn + t[None, :] * s_Bl, mask=nt_mask,
                     other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + pid_b * s_Cb + n[:, None] * s_Cn + t[None, :] * s_Cl, mask=nt_mask,
                     other=0.0).to(tl.float32)
        # padded slots get dt = 0: a = 1, b = 0, the identity of the combine, so they pass h through
        dt = tl.where(m2, _softplus(dl + bias[:, None]), 0.0)
        a = tl.exp2(dt[:, None, :] * A2[:, :, None])  # [BD, NP, T]
        b = (dt * u)[:, None, :] * Bt[None, :, :]
        acum, hs = tl.associative_scan((a, b), 2, _combine)
        hh = acum * h[:, :, None] + hs  # the states of the tile's tokens
        y = _sum(hh * Ct[None, :, :], axis=1)  # [BD, T]
        out = (y + Dskip[:, None] * u) * (zz * _sigmoid(zz))
        tl.store(out_ptr + pid_b * s_ob + d[:, None] * s_od + t[None, :] * s_ol, out.to(out_ptr.dtype.element_ty),
                 mask=m2)
        h = _sum(tl.where((j == T - 1)[None, None, :], hh, 0.0), axis=2)


@triton.jit
def selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, g_ptr, states_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
    Dm, N, L, n_tiles: tl.constexpr,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_Ad, s_An, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl,
    s_zb, s_zd, s_zl, s_gb, s_gd, s_gl, s_sb, s_sd, s_sn, s_sk,
    REVERSE: tl.constexpr, NP: tl.constexpr, T: tl.constexpr, BD: tl.constexpr,
):
    """Gradients of the forward kernel's output, with g = dLoss/dout.

    du, ddelta, dz: [B, D, L] contiguous, in their own dtypes. dB, dC: [B, N, L] fp32, zeroed by the
    caller, accumulated with atomic adds over channel blocks. dA [B, D, N], dD and dbias [B, D]: fp32
    per-sequence partials, written plainly (each program owns its (b, channel block)); the caller sums
    them over b.

    Tiles are walked opposite to the forward. Per tile: recompute the states from the saved start
    state (one scan), then the state gradient G[t] = C[t] dy[t] + a[next(t)] G[next(t)] (one scan in
    the opposite direction, next(t) being the following token in scan order, its decay loaded
    shifted), carrying G [BD, N] between tiles. Everything else is local:
    dlog a[t] = G[t] a[t] h[prev] = G[t] (h[t] - b[t]); dA += sum_t dlog a dt;
    ddt = sum_n (dlog a A + G B u); du = dt sum_n G B + D dy; dB += sum_d G dt u; dC += sum_d dy h.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    d = pid_d * BD + tl.arange(0, BD)
    n = tl.arange(0, NP)
    j = tl.arange(0, T)
    dmask = d < Dm
    nmask = n < N
    dn_mask = dmask[:, None] & nmask[None, :]
    A = tl.load(A_ptr + d[:, None] * s_Ad + n[None, :] * s_An, mask=dn_mask, other=0.0).to(tl.float32)
    A2 = A * LOG2E
    Dskip = tl.load(D_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    carry = tl.full([BD, NP], 0.0, tl.float32)  # dLoss/dh at the first token (scan order) of the later tile
    dA_acc = tl.full([BD, NP], 0.0, tl.float32)
    dD_acc = tl.full([BD], 0.0, tl.float32)
    dbias_acc = tl.full([BD], 0.0, tl.float32)
    for i in range(n_tiles):
        if REVERSE:
            k = i
        else:
            k = n_tiles - 1 - i
        t = _positions(k, j, REVERSE, T)
        if REVERSE:
            tn = t - 1
        else:
            tn = t + 1
        tmask = t < L
        nxt_mask = (tn >= 0) & (tn < L)
        m2 = dmask[:, None] & tmask[None, :]
        nt_mask = nmask[:, None] & tmask[None, :]
        row_u = pid_b * s_ub + d[:, None] * s_ud
        row_d = pid_b * s_db + d[:, None] * s_dd
        row_z = pid_b * s_zb + d[:, None] * s_zd
        row_g = pid_b * s_gb + d[:, None] * s_gd
        u = tl.load(u_ptr + row_u + t[None, :] * s_ul, mask=m2, other=0.0).to(tl.float32)
        dl = tl.load(delta_ptr + row_d + t[None, :] * s_dl, mask=m2, other=0.0).to(tl.float32)
        dl_n = tl.load(delta_ptr + row_d + tn[None, :] * s_dl, mask=dmask[:, None] & nxt_mask[None, :],
                       other=0.0).to(tl.float32)
        zz = tl.load(z_ptr + row_z + t[None, :] * s_zl, mask=m2, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row_g + t[None, :] * s_gl, mask=m2, other=0.0).to(tl.float32)
        Bt = tl.load(B_ptr + pid_b * s_Bb + n[:, None] * s_Bn + t[None, :] * s_Bl, mask=nt_mask,
                     other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + pid_b * s_Cb + n[:, None] * s_Cn + t[None, :] * s_Cl, mask=nt_mask,
                     other=0.0).to(tl.float32)
        h0 = tl.load(states_ptr + pid_b * s_sb + d[:, None] * s_sd + n[None, :] * s_sn + k * s_sk, mask=dn_mask,
                     other=0.0)
        pre = dl + bias[:, None]
        dt = tl.where(m2, _softplus(pre), 0.0)
        dtu = dt * u
        b = dtu[:, None, :] * Bt[None, :, :]  # [BD, NP, T]
        acum, hs = tl.associative_scan((tl.exp2(dt[:, None, :] * A2[:, :, None]), b), 2, _combine)
        hh = acum * h0[:, :, None] + hs  # recomputed states
        y = _sum(hh * Ct[None, :, :], axis=1)  # [BD, T]
        sz = _sigmoid(zz)
        dy = g * zz * sz
        dz = g * (y + Dskip[:, None] * u) * sz * (1.0 + zz * (1.0 - sz))
        dD_acc += _sum(dy * u, axis=1)
        # the decay that multiplies G[next(t)]: a at the next token in scan order, 0 past the sequence
        dt_n = tl.where(dmask[:, None] & nxt_mask[None, :], _softplus(dl_n + bias[:, None]), 0.0)
        a_n = tl.where(nxt_mask[None, None, :], tl.exp2(dt_n[:, None, :] * A2[:, :, None]), 0.0)
        ga, gb = tl.associative_scan((a_n, dy[:, None, :] * Ct[None, :, :]), 2, _combine, reverse=True)
        G = ga * carry[:, :, None] + gb  # dLoss/dh[t]
        dloga = G * (hh - b)  # dLoss/d(dt A) = G a h[prev]
        dA_acc += _sum(dloga * dt[:, None, :], axis=2)
        GB = _sum(G * Bt[None, :, :], axis=1)  # [BD, T]
        ddt = _sum(dloga * A[:, :, None], axis=1) + GB * u
        du = dt * GB + Dskip[:, None] * dy
        ddl = tl.where(m2, ddt * _sigmoid(pre), 0.0)  # softplus' = sigmoid
        dbias_acc += _sum(ddl, axis=1)
        off = pid_b * Dm * L + d[:, None] * L + t[None, :]  # the [B, D, L] gradients are contiguous
        tl.store(du_ptr + off, du.to(du_ptr.dtype.element_ty), mask=m2)
        tl.store(ddelta_ptr + off, ddl.to(ddelta_ptr.dtype.element_ty), mask=m2)
        tl.store(dz_ptr + off, dz.to(dz_ptr.dtype.element_ty), mask=m2)
        # dB and dC sum over all D channels, i.e. over the programs of this sequence: atomic adds into
        # one fp32 [B, N, L] buffer (what mamba-ssm's CUDA kernel does). Per-block partials would be
        # deterministic but cost D / BD extra [B, N, L] fp32 passes written and read back (32 at the
        # MEN stage-2 size with BD 2), more than the whole rest of the backward's traffic. The price:
        # dB and dC may differ run to run in the last bits (summation order), never more.
        offn = pid_b * N * L + n[:, None] * L + t[None, :]
        # relaxed: the sums are read only after the kernel ends, so no ordering between programs is needed
        tl.atomic_add(dB_ptr + offn, _sum(G * dtu[:, None, :], axis=0), mask=nt_mask, sem="relaxed")
        tl.atomic_add(dC_ptr + offn, _sum(hh * dy[:, None, :], axis=0), mask=nt_mask, sem="relaxed")
        carry = _sum(tl.where((j == 0)[None, None, :], G, 0.0), axis=2)
    # dA, dD, dbias also sum over b and t: per-(b, channel) partials, summed over b by the caller
    # (deterministic, and only B D N floats)
    tl.store(dA_ptr + pid_b * Dm * N + d[:, None] * N + n[None, :], dA_acc, mask=dn_mask)
    tl.store(dD_ptr + pid_b * Dm + d, dD_acc, mask=dmask)
    tl.store(dbias_ptr + pid_b * Dm + d, dbias_acc, mask=dmask)
