"""Evaluation throughput at the mid config on this machine: images/s generated and scored, jaxlcd vs PyTorch.

    PYTHONPATH=. python benchmarks/eval.py [--images 8] [--batch 4] [--steps 2]

Generation: `jaxlcd.metrics.generate.generate_row` (what `python -m jaxlcd.eval` runs) on the mid LCM pipeline of
`benchmarks/sampling.py` (quarter-width SD UNet with time_cond_proj_dim, the SD VAE at 256 px), against diffusers'
`LatentConsistencyModelPipeline` on the same folder, prompts and batch size. Scoring: CLIPScore with a random CLIP
ViT-L/14 (openai/clip-vit-large-patch14's architecture) through `jaxlcd.metrics.scores.Scorer` against transformers'
`CLIPProcessor` + `CLIPModel` (torchmetrics' computation), and the FID Inception features
(`jaxlcd.metrics.fid.inception_features`, random weights) against torch-fidelity's `FeatureExtractorInceptionV3`.
Each timing after one warm-up call (jax compiles there); medians of ``--repeats``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "tests")]   # tests/: the torch-fidelity import helper

import torch

from common import machine, median_seconds, print_table

CLIP_L = dict(projection_dim=768,
              text_config=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                               bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
              vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                 image_size=224, patch_size=14, hidden_act="quick_gelu"))


def write_clip_l(path: str) -> str:
    import transformers

    from jaxlcd.tokenizer import build_clip_tokenizer_files

    torch.manual_seed(0)
    transformers.CLIPModel(transformers.CLIPConfig(**CLIP_L)).save_pretrained(path)
    build_clip_tokenizer_files(path)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import diffusers
    import transformers
    from PIL import Image
    from safetensors.torch import save_file

    import fidelity_ref
    from jaxlcd.metrics import fid, generate, scores
    from jaxlcd.pipeline import load_pipeline
    from jaxlcd.rewards.convert import main as convert_main
    from sampling import make_pipeline
    from test_fid import _random_state_dict

    print(f"machine: {machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads)\n")
    tmp = tempfile.mkdtemp(prefix="bench_eval_")
    prompts = [f"a photo of object {i} on a table" for i in range(args.images)]
    rows = []

    # generation
    path = make_pipeline(os.path.join(tmp, "mid"))
    row = generate.Row(f"mid lcm{args.steps}", path, "lcm", args.steps, 8.5)
    out = generate.generate_row(load_pipeline(path), row, prompts, os.path.join(tmp, "out"), 0, args.batch)
    lcm = diffusers.LatentConsistencyModelPipeline.from_pretrained(path, safety_checker=None)
    lcm.scheduler = diffusers.LCMScheduler.from_config(lcm.scheduler.config)
    lcm.set_progress_bar_config(disable=True)

    def torch_generate():
        with torch.no_grad():
            for start in range(0, args.images, args.batch):
                lcm(prompts[start:start + args.batch], num_inference_steps=args.steps, guidance_scale=8.5,
                    output_type="np")
    torch_s = median_seconds(torch_generate, args.repeats)
    rows.append({"stage": f"generate (mid, LCM {args.steps} steps, 256 px, batch {args.batch})",
                 "jaxlcd img/s": out["images_per_s"], "PyTorch img/s": args.images / torch_s})
    images = generate.load_images(os.path.join(tmp, "out"), row, args.images)

    # CLIPScore with a CLIP ViT-L/14
    clip = write_clip_l(os.path.join(tmp, "clip_l"))
    scorer = scores.Scorer("clipscore", clip, batch_size=args.batch)
    jax_s = median_seconds(lambda: scorer(images, prompts), args.repeats)
    model = transformers.CLIPModel.from_pretrained(clip).eval()
    processor = transformers.CLIPProcessor(image_processor=transformers.CLIPImageProcessor(),
                                           tokenizer=transformers.CLIPTokenizer.from_pretrained(clip))

    def torch_clipscore():
        with torch.no_grad():
            for start in range(0, args.images, args.batch):
                sl = slice(start, start + args.batch)
                model.get_image_features(**processor(images=[Image.fromarray(i) for i in images[sl]],
                                                     return_tensors="pt"))
                model.get_text_features(**processor(text=prompts[sl], padding=True, return_tensors="pt"))
    torch_s = median_seconds(torch_clipscore, args.repeats)
    rows.append({"stage": "CLIPScore (CLIP ViT-L/14, 224 px)", "jaxlcd img/s": args.images / jax_s,
                 "PyTorch img/s": args.images / torch_s})

    # FID Inception features
    state = _random_state_dict()
    save_file(state, os.path.join(tmp, "inc.safetensors"))
    convert_main(["--kind", "fid_inception", os.path.join(tmp, "inc.safetensors"), os.path.join(tmp, "fid.safetensors")])
    weights = os.path.join(tmp, "fid.safetensors")
    jax_s = median_seconds(lambda: fid.inception_features(images, weights, batch_size=args.batch), args.repeats)
    torch.save(state, os.path.join(tmp, "inc.pth"))
    extractor = fidelity_ref.inception_class()("inception-v3-compat", ["2048"],
                                               feature_extractor_weights_path=os.path.join(tmp, "inc.pth"))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    def torch_inception():
        with torch.no_grad():
            for start in range(0, args.images, args.batch):
                extractor(x[start:start + args.batch])
    torch_s = median_seconds(torch_inception, args.repeats)
    rows.append({"stage": "FID Inception features (256 -> 299 px)", "jaxlcd img/s": args.images / jax_s,
                 "PyTorch img/s": args.images / torch_s})
    for r in rows:
        r["jaxlcd / PyTorch"] = r["jaxlcd img/s"] / r["PyTorch img/s"]
    print_table(rows, ["stage", "jaxlcd img/s", "PyTorch img/s", "jaxlcd / PyTorch"])
    t = sum(1 / r["jaxlcd img/s"] for r in rows)
    print(f"\njaxlcd end to end: {1 / t:.3g} img/s generated and scored ({t:.3g} s per image)")


if __name__ == "__main__":
    main()
