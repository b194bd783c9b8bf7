"""The training run as a library (docs/design.md §3): what the Prefect flow, the benchmarks and every rank of a
multi-process run share.

- `warm`:   the resources loaded once per run (sampler engine, policy + optimizer, reference, rewards) and
            `load_warm`, which loads them;
- `steps`:  one round's steps as plain functions, no I/O: `sample_round`, `score_round`, `advantage_round`,
            `update_round`, `evaluate_round`;
- `resume`: where a run stands (manifests, checkpoint) and where it resumes; round directories and prompts;
- `writer`: a round's artifacts and manifest, the background checkpoint writer, the run's summary outputs;
- `lock`:   one run per checkout.

Nothing here starts Prefect or MLflow; `flows/train.py` wraps these steps as Prefect tasks and tells the story.
"""
