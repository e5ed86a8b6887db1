"""Generate text with a linearized model: one optimized module prefills the prompts and decodes.

    python -m examples.generate                   # tiny Llama, layer 0 gla + layer 1 softmax, batched prompts
    python -m examples.generate --kind retention --layers all --sample
    python -m examples.generate --tiny            # what the tests run
    python -m examples.generate --fusions norms,rotary   # only these decode fusions, checked against none
    python -m examples.generate --target lfm2 --layers 1  # LFM2: its short conv (layer 0) decodes from a conv state

The prompts have different lengths and run as one batch; each row is checked against generating
it alone, and the tokens stream out as they are produced. The decode program is built with the library's default fusions (RMSNorms,
rotary embeddings, gated MLP activations and KV-cache writes as single kernels); with --fusions, with exactly those
(names from rewrite.decode.fusion_switches, sibling projections among them; "none" for no fusion), and its tokens
are checked against the program with no fusion.
"""

from __future__ import annotations

import argparse

import torch

import rewrite
from examples.models import TARGETS
from rewrite.decode import decode_program
from rewrite.decode.fusion_switches import SWITCHES, check_names, defaults_on, fusions_only

DECODERS = ("llama", "qwen2", "qwen3", "mistral", "gpt2", "lfm2", "handwritten")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="llama", choices=DECODERS)
    parser.add_argument("--kind", default="gla", help="mixer kind of the linearized layers")
    parser.add_argument("--layers", default="0", help="layers to linearize ('all', '0', '1:'); the rest keep softmax")
    parser.add_argument("--new", type=int, default=12, help="new tokens per prompt")
    parser.add_argument("--sample", action="store_true", help="sample (temperature 0.8, top-p 0.9) instead of greedy")
    parser.add_argument("--tiny", action="store_true", help="4 new tokens (quick check)")
    parser.add_argument("--fusions", default=None,
                        help=f"comma-separated decode fusions to build with ({', '.join(SWITCHES)}; 'none': no fusion; "
                             "default: the library's defaults), checked against no fusion")
    args = parser.parse_args(argv)
    if args.fusions is not None:
        names = [name.strip() for name in args.fusions.split(",") if name.strip() and name.strip() != "none"]
        try:
            args.fusions = check_names(names)
        except ValueError as exc:
            parser.error(f"--fusions: {exc}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Build the module, generate for prompts of three lengths, check rows against one-by-one runs."""
    args = parse_args(argv)
    new = 4 if args.tiny else args.new
    model, inputs = TARGETS[args.target](batch=3, length=10)
    ids = inputs["input_ids"] if isinstance(inputs, dict) else inputs[0]
    example = {"example_kwargs": {"input_ids": ids}} if isinstance(inputs, dict) else {"example_inputs": (ids,)}
    om = rewrite.optimize(model, [{"mixer": {"kind": args.kind, "layers": args.layers}}, "stateful"], **example)
    print(om.report.summary())
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # prompt lengths 4, 8, 10
    mask[1, :2] = 0
    options = {"max_new_tokens": new}
    if args.sample:
        options.update(do_sample=True, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(0))

    def show(step) -> None:
        print("step:", step.tokens.tolist())

    fusions = defaults_on() if args.fusions is None else args.fusions
    with fusions_only(fusions):
        out = om.generate(ids, mask, streamer=show, **options)
        program = decode_program(om)
    print("generated:\n", out[:, ids.shape[1]:])
    print(f"decode fusions: {', '.join(fusions) or 'none'} ({program.fused_norms} norms, {program.fused_rotations} "
          f"rotations, {program.fused_gated_activations} gated activations fused)")
    if args.sample:
        return 0
    if fusions:
        with fusions_only([]):
            unfused = om.generate(ids, mask, **options)
        if not torch.equal(unfused, out):
            print(f"the tokens with {', '.join(fusions)} fused differ from the unfused program's")
            return 1
        print("the fused program's tokens equal the unfused program's")
    for row in range(ids.shape[0]):
        start = int((mask[row] == 0).sum())
        alone = om.generate(ids[row : row + 1, start:], max_new_tokens=new)
        if not torch.equal(alone[0, -new:], out[row, -new:]):
            print(f"row {row}: batched tokens differ from generating the row alone")
            return 1
    print("every row matches its one-by-one generation")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
