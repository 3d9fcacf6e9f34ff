"""A briefly trained tiny run whose last held-out evaluation covers its whole eval split, and a gloo
worker that scores it with ``tools/evaluate.py`` and clip by clip."""

from train_harness import TINY, run_configs, small_run

EVAL_CLIPS = 64
# 10 steps at the tiny config's rate: some answers right (the answer prior), not all; a checkpoint and a
# held-out evaluation at iteration 5 too (the fallback when iteration 10's is damaged).
EVAL_RUN = {
    "checkpoint.save_interval": 5,
    "training.eval_interval": 5,
    "data.train_samples": 320,
    "data.eval_samples": EVAL_CLIPS,
    "training.micro_batch_size": 16,
    "training.global_batch_size": 32,
    "training.train_iters": 10,
    "training.eval_iters": EVAL_CLIPS // 32,  # the sampler draws each clip once: the whole split
    "training.eval_without_vision": False,
    "parallel.context_parallel_size": 2,
}


def train_then_evaluate(rank: int, world_size: int, data: str, run: str, output: str) -> dict:
    """Worker (2 ranks): train and save the run, score it with the tool in-process (CP 2), and per clip
    the greedy answer of an unbatched generation and the teacher-forced verdict."""
    from megatron.core import parallel_state as ps

    from lvx_megatron.generation import answer_text, build_prompts, generate, load_for_generation
    from lvx_megatron.generation.evaluation import exact_match, teacher_forced_right
    from lvx_megatron.training.data import prepare_datasets
    from tools.evaluate import main

    run_configs(rank, world_size, [(TINY, small_run(data, run, **EVAL_RUN, **{"checkpoint.save": run}))])
    ps.destroy_model_parallel()
    status = main([run, "--batch-size", "24", "--output", output])
    loaded = load_for_generation(run)
    dataset = prepare_datasets(loaded.cfg)["eval"]
    generated, forced = [], []
    for i in range(len(dataset)):
        sample = dataset[i]
        prompt = build_prompts(loaded.cfg, loaded.tokenizer, [sample])
        ids = generate(loaded.model, prompt.tokens, prompt.images, 16, eos_id=loaded.tokenizer.eos_id)[0]
        generated.append(exact_match(answer_text(loaded.tokenizer, ids), sample["answer"]))
        forced.append(bool(teacher_forced_right(loaded, [sample])[0]))
    types = [dataset[i].get("qtype") for i in range(len(dataset))]
    ps.destroy_model_parallel()
    return {"status": status, "generated": generated, "forced": forced, "types": types}
