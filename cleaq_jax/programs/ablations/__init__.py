"""The ablation study of the paper (Tables IV, V, VI and Fig. 12): every variant x seed on one shard set.

    python -m cleaq_jax.programs.ablations --data DIR --workdir DIR --seeds 3 [--size S]
        [--variants dr_only,cleaq_dr,...] [--preset tiny|bench|full] [--build-synthetic N]
        [--jobs J] [--tabulate-only] [--config.KEY=VALUE ...]

Each variant is a config in configs/ablations/ (which subnetworks train); the preset
(configs/ablations/presets.py) sets sizes and schedule; ``--config.KEY=VALUE`` flags override both.
Run ``<variant>, seed k`` is ``python -m cleaq_jax.main --config=configs/ablations/<variant>.py
--workdir=<workdir>/<variant>/seed<k> --config.seed=k --config.data.dir=<data> ...`` in a subprocess:
each run starts with clean memory and JAX state, a crash stops only that run, its exact command is
recorded, and its log lands in ``<run>/train.log``. Runs share XLA's persistent compilation cache
(``<workdir>/.jax_cache`` unless JAX_COMPILATION_CACHE_DIR is set), so later seeds skip compilation.

A run is finished when its final stage wrote ``eval/eval.json`` (stage 3 for the joint variants,
stage 1 for dr_only / iqe_only / iqe_no_seg, stage 2 for iqa_*); finished runs are skipped, so the
study resumes where it stopped (an unfinished run resumes from its own checkpoints). The study then
tabulates every finished run's eval.json into ``results.json``, ``results.md``,
``per_quality_kappa.png`` and ``enhancement_examples.png`` in the workdir: first the pre-declared
comparisons (``plan.COMPARISONS``: paired-by-seed differences, their t and bootstrap intervals and the
verdict of the fixed rule), then mean and sample standard deviation over seeds. Shards from data_prep
(EyeQ, Messidor) work unchanged: pass ``--config.data.num_grades=4`` for Messidor.

Modules, in the order a study uses them:

- `cli`: the command line (``__main__`` calls it).
- `shards`: the shard set every run shares (checked, or built synthetic).
- `plan`: which variants, seeds and runs, and each run's config flags and command.
- `run_files`: where a run's eval.json and run.json are, and reading and writing them.
- `execution`: running the unfinished runs as subprocesses.
- `statistics`: mean and sample standard deviation over seeds, paired differences between variants and
  the pre-declared test's intervals of them.
- `collect`: every table's numbers, gathered from the trained runs' files.
- `tables`: results.md, the Markdown page of those tables.
- `figures`: the per-quality kappa bars and the enhancement examples.
- `results`: what the study was, and writing results.json, results.md and the figures.
"""
