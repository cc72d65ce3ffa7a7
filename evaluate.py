"""Measure a trained model: FID, CLIP score and prompt adherence of a U-Net's samples over a
guidance sweep, or the reconstruction quality of a VAE.

python evaluate.py ckpt=runs/unet/latest metrics=[fid,clip_score] num_samples=1000
python evaluate.py experiment=demo metrics=[fid,clip_score,adherence] num_samples=300 \
    cfg_scales=[1,3,7.5] steps=[25,50]
python evaluate.py vae_export=runs/vae/latest/export metrics=[reconstruction]

Writes results.json (every number with the settings it depends on), results.md, sweep.png and
the samples (lossless PNGs) into out_dir (default runs/eval/<date_time>).
"""

import sys

import hydra
from omegaconf import DictConfig

import ldm.config.schemas  # noqa: F401  (registers the schemas conf/*.yaml name)
from ldm.config.command_line import refuse_null_config_groups
from ldm.evaluation import EvaluationError, run_evaluation
from ldm.sampling import SamplingError


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        result = run_evaluation(cfg)
    except (EvaluationError, SamplingError) as error:  # input the user can fix: a message
        raise SystemExit(f"evaluate.py: {error}") from None
    print((result.out_dir / "results.md").read_text(encoding="utf-8"))
    print(f"Results in {result.out_dir}")


if __name__ == "__main__":
    refuse_null_config_groups(sys.argv[1:])
    main()
