"""The decode-fusion, row-gather, KV-cache-write and split-KV decode attention kernels compile for an H100 (sm_90) with the installed Triton, on
a machine without a GPU: Triton's front end, its passes, libdevice linking and ptxas accept every launch form the
launchers use (the interpreter, which runs the other kernel tests here, checks none of that)."""

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

SCRIPT = r'''
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rewrite.kernels.gated_activation import triton_kernels as gated
from rewrite.kernels.kv_cache_attention import triton_decode as kv_attention
from rewrite.kernels.kv_cache_write import triton_kernels as kv_write
from rewrite.kernels.rms_norm import triton_kernels as norms
from rewrite.kernels.rotary import triton_kernels as rotary
from rewrite.kernels.row_gather import triton_kernels as row_gather


def compile_sm90(kernel, pointers, scalars, constants, options):
    names = kernel.arg_names
    signature = {}
    for name in names:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointers.get(name, pointers["*"])
        else:
            signature[name] = scalars.get(name, "i64")
    unknown = set(signature) - set(names)
    assert not unknown, unknown
    source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constants.items()})
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


compiled = 0
for x, out in (("*bf16", "*bf16"), ("*fp16", "*fp16"), ("*fp32", "*fp32"), ("*bf16", "*fp32")):
    for rounds in (True, False):
        compile_sm90(norms._rms_norm_cast_fwd_kernel, {"x_ptr": x, "out_ptr": out, "*": "*bf16"},
                     {"n_cols": "i32", "eps": "fp32", "weight_offset": "fp32"},
                     {"ROUND_NORMED": rounds, "BLOCK": 2048}, {"num_warps": 4})
        compiled += 1
for x in ("*bf16", "*fp16", "*fp32"):
    for rounds in (True, False):
        compile_sm90(norms._add_rms_norm_cast_fwd_kernel,
                     {"x_ptr": x, "residual_ptr": x, "sum_ptr": x, "out_ptr": x, "*": "*bf16"},
                     {"n_cols": "i32", "eps": "fp32", "weight_offset": "fp32"},
                     {"ROUND_NORMED": rounds, "BLOCK": 2048}, {"num_warps": 4})
        compiled += 1
for x, angles, bf16 in (("*bf16", "*bf16", True), ("*fp16", "*fp16", False), ("*bf16", "*fp32", False)):
    for kernel in (rotary._rotary_kernel, rotary._rotary_pair_kernel):
        pointers = {"*": x}
        pointers.update({name: angles for name in kernel.arg_names if "cos" in name or "sin" in name})
        pointers.update({name: ("*bf16" if bf16 else "*fp32" if angles == "*fp32" else x)
                         for name in kernel.arg_names if "out" in name})
        compile_sm90(kernel, pointers, {}, {"BLOCK": 64, "COMPUTE": tl.float32, "BF16_BITS": bf16},
                     {"num_warps": 1, "enable_fp_fusion": False})
        compiled += 1
for count in (1, 5):  # a routed block's hidden state (bf16), cos / sin (fp32), mask and visible mask (bytes)
    compile_sm90(row_gather._gather_rows_kernel,
                 {"rows_ptr": "*i64", "src2_ptr": "*fp32", "dst2_ptr": "*fp32", "src3_ptr": "*u8", "dst3_ptr": "*u8",
                  "src4_ptr": "*u8", "dst4_ptr": "*u8", "*": "*bf16"}, {f"width{i}": "i32" for i in range(6)},
                 {"COUNT": count, "BLOCK": 2048}, {"num_warps": 8})
    compiled += 1
for x in ("*bf16", "*fp16", "*fp32"):
    for kind in (0, 1):  # silu, gelu_tanh; libdevice's exp / tanh as on CUDA
        compile_sm90(gated._gated_activation_kernel, {"*": x}, {"n_cols": "i32"},
                     {"KIND": kind, "LIBDEVICE": True, "BLOCK": 1024}, {"num_warps": 4, "enable_fp_fusion": False})
        compiled += 1
for new, cache, bits in (("*bf16", "*bf16", False), ("*fp32", "*bf16", True), ("*fp16", "*fp16", False),
                         ("*fp32", "*fp16", False)):  # a decode step's k / v into its KV cache
    compile_sm90(kv_write._kv_cache_write_kernel,
                 {"index_ptr": "*i64", "k_ptr": new, "v_ptr": new, "*": cache}, {},
                 {"BLOCK": 128, "K_BF16_BITS": bits, "V_BF16_BITS": bits}, {"num_warps": 2})
    compiled += 1
for has_last in (True, False):  # the split-KV decode kernel as the decode sites launch it (bf16, GQA 4)
    compile_sm90(kv_attention._split_kernel,
                 {"m_ptr": "*u8", "o_ptr": "*fp32", "lse_ptr": "*fp32", "last_ptr": "*i64" if has_last else "*u8",
                  "*": "*bf16"}, {"qk_scale": "fp32"},
                 {"BM": 16, "BLOCK_N": 64, "BK": 64, "BV": 64, "PRECISION": "tf32", "SKIP_EMPTY": False,
                  "MASK_UNSEEN": False, "HAS_LAST": has_last}, {"num_warps": 4, "num_stages": 3})
    compiled += 1
print("compiled", compiled)
'''


def _ptxas() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


@pytest.mark.skipif(not os.path.exists(_ptxas()), reason="this Triton has no CUDA backend with ptxas")
def test_decode_fusion_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not interpreted
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled 34" in result.stdout
