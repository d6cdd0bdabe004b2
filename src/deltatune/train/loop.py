"""The training loop, readable top to bottom: setup → steps → eval → checkpoint → save delta.

    result = train(load_recipe("recipe.yaml"))

A step draws ``grad_accum`` micro-batches, normalises their summed loss by the step's total
target count (over micro-batches and processes), clips, steps AdamW and the schedule. Every
``save_every`` steps — and on Ctrl-C — an atomic checkpoint is written; ``resume=run_dir``
continues from the newest one with identical data order and RNG.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from deltatune.data import iter_batches, make_collator
from deltatune.evaluation.ledger import LEDGER_FILE, CostLedger, directory_bytes, stored_parameters, write_ledger
from deltatune.train import checkpoint as ckpt
from deltatune.train.config import TrainRecipe, recipe_to_yaml
from deltatune.train.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, slice_batch, to_device
from deltatune.train.metrics import MetricsLog, accuracy_and_macro_f1, peak_rss_mb, plot_loss_curve
from deltatune.train.objective import CausalLMObjective, ClassificationObjective, predict_classes
from deltatune.train.optim import build_optimizer, build_scheduler
from deltatune.train.setup import build_model, make_stream, prepare_data, trainable_parameters
from deltatune.utils.errors import ConfigError
from deltatune.utils.interrupt import interrupts_held
from deltatune.utils.io import atomic_dir, write_json_atomic, write_text_atomic
from deltatune.utils.memory import mmap_threshold_mb, tune_allocator
from deltatune.utils.seed import seed_everything


def train(recipe: TrainRecipe, resume: str | Path | None = None, stop_after: int | None = None) -> dict[str, Any]:
    """Run the recipe; returns the final metrics (and before-training metrics if asked for).

    ``stop_after``: end the run (with a checkpoint) after that many steps, as an interruption would.
    """
    import deltatune

    info = init_distributed()
    cfg = recipe.train
    tune_allocator(int(mmap_threshold_mb(cfg.malloc_mmap_threshold_mb, recipe.optim.name) * 2**20))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(resume) if resume else recipe.run_dir
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", recipe_to_yaml(recipe))
    seed_everything(cfg.seed)

    tokenizer = deltatune.load_tokenizer(recipe.model.name)
    data = prepare_data(recipe, tokenizer, run_dir, write=info.is_main)
    seed_everything(cfg.seed)  # the delta's init does not depend on how much data was read
    model = build_model(recipe, data.report.num_labels).to(info.device)
    classification = recipe.model.task == "sequence-classification"
    objective = ClassificationObjective(model) if classification else CausalLMObjective(model, cfg.loss_chunk_size)
    if cfg.compile:
        objective = torch.compile(objective)
    wrapped = torch.nn.parallel.DistributedDataParallel(objective) if info.enabled else objective
    params = trainable_parameters(model)
    # Fixed now: an optimizer may freeze and unfreeze parameters as it goes (LISA), and a checkpoint
    # must hold every parameter the run trains, whatever requires grad at that moment.
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(params, recipe.optim, model, objective)
    owns_step = getattr(optimizer, "owns_step", False)  # LOMO/MeZO run their own forward/backward (deltatune.optim)
    if owns_step and info.enabled:
        raise ConfigError(f"optim.name {recipe.optim.name} runs its own forward/backward passes and does not support data parallel training")
    scheduler = build_scheduler(optimizer, cfg.max_steps, recipe.schedule)
    stream = make_stream(recipe, data, tokenizer, model)
    selector = None
    if cfg.token_selection is not None:  # relabels each micro-batch before its loss (deltatune.select.token_select)
        from deltatune.select.token_select import TokenSelector

        selector = TokenSelector(model, cfg.token_selection.beta, cfg.token_selection.keep_ratio)
    # What a checkpoint saves besides the parameters and the delta's declared training state.
    parts = {"optimizer": optimizer, "scheduler": scheduler, **({"selector": selector} if selector is not None else {})}

    start, early = 0, {"best": None, "bad_evals": 0}
    totals = {"train_seconds": 0.0, "tokens": 0, "examples": 0}  # for the cost ledger, carried across resumes
    if resume:
        if info.is_main:
            ckpt.remove_partial(run_dir)
        state = ckpt.load_checkpoint(run_dir, model, trainable, parts)
        stream.load_state_dict(state["data"])
        start, early, totals = state["step"], state.get("early", early), state.get("totals", totals)
    tensorboard = run_dir / "tensorboard" if cfg.report_to == "tensorboard" else None
    log = MetricsLog(run_dir / "metrics.jsonl", resume_step=start if resume else None, tensorboard=tensorboard) if info.is_main else None
    say = print if info.is_main else (lambda *a, **k: None)
    say(f"run: {run_dir}  |  {data.report.summary()}")
    if hasattr(model, "format_parameter_report"):
        say(model.format_parameter_report())

    before = None
    if recipe.eval.before_training and start == 0:
        before = evaluate(model, objective, data, recipe, tokenizer)
        say("before training: " + format_metrics(before))
        if log:
            log.log({"step": 0, **{f"eval_{k}": v for k, v in before.items()}})

    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()
    bar = tqdm(total=cfg.max_steps, initial=start, desc="train", unit="step", disable=not (cfg.progress and info.is_main))
    step, last_loss = start, float("nan")
    # The data position that goes with the weights of `step`: an interruption inside a step must
    # not checkpoint the position of batches whose update never happened.
    data_state = stream.state_dict()
    model.train()
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            micro = [to_device(slice_batch(next(stream), info), info.device) for _ in range(cfg.grad_accum)]
            if selector is not None:
                micro = [selector(model, b) for b in micro]
            local_targets = sum(int((b["labels"][:, 1:] != -100).sum()) if not classification else len(b["labels"]) for b in micro)
            total_targets = all_reduce_sum(torch.tensor(float(local_targets)), info).item()

            def step_loss(i, batch, total_targets=total_targets):
                """(the micro-batch's share of the step loss, to differentiate; its detached loss sum)."""
                with autocast:
                    loss_sum, _ = wrapped(batch)
                # DDP averages gradients over processes; scale so the result is sum / global count.
                loss = loss_sum * info.world / max(total_targets, 1.0)
                # A delta's penalty (e.g. LoFiT's L1) counts once per step; every process adds the same
                # term, so DDP's average keeps it as is. The logged loss is the data loss only.
                penalty = model.regularization_loss() if i == 0 and hasattr(model, "regularization_loss") else None
                return (loss if penalty is None else loss + penalty), loss_sum.detach().float().cpu()

            if not owns_step:
                loss_total = torch.zeros(())
                for i, batch in enumerate(micro):
                    loss, loss_sum = step_loss(i, batch)
                    loss.backward()
                    loss_total += loss_sum
            # From the first weight update to the step's log line nothing may be interrupted, or a
            # checkpoint would pair updated weights with the old step and the batch would be replayed
            # (an optimizer that owns its step updates inside its passes, so they are held too).
            with interrupts_held():
                if owns_step:
                    loss_total = optimizer.train_step(micro, step_loss)
                else:
                    if recipe.optim.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(params, recipe.optim.max_grad_norm)
                    optimizer.step()
                scheduler.step()
                if selector is not None:
                    selector.update(model)
                if hasattr(model, "on_train_step"):  # before zero_grad: hooks may read the step's gradients
                    model.on_train_step(step + 1)
                optimizer.zero_grad(set_to_none=True)
                step += 1
                data_state = stream.state_dict()
                last_loss = all_reduce_sum(loss_total, info).item() / max(total_targets, 1.0)
                seconds = time.perf_counter() - t0
                tokens = all_reduce_sum(torch.tensor(float(sum(real_tokens(b) for b in micro))), info).item()
                totals["train_seconds"] += seconds
                totals["tokens"] += int(tokens)
                totals["examples"] += int(all_reduce_sum(torch.tensor(float(sum(batch_examples(b) for b in micro))), info).item())
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tokens / seconds:.0f}")
                if log and (step % cfg.log_every == 0 or step == cfg.max_steps or step == start + 1):
                    log.log({"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens / seconds,
                             "step_seconds": seconds, "peak_rss_mb": peak_rss_mb()})
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                metrics = evaluate(model, objective, data, recipe, tokenizer)
                model.train()
                if log:
                    log.log({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}})
                if _should_stop(metrics, early, cfg.early_stopping_patience):
                    say(f"early stopping at step {step}: no improvement in {cfg.early_stopping_patience} evaluations")
                    break
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                _checkpoint(info, run_dir, step, model, trainable, parts, data_state, early, totals, cfg.keep_last)
            if stop_after is not None and step >= start + stop_after:
                _checkpoint(info, run_dir, step, model, trainable, parts, data_state, early, totals, cfg.keep_last)
                return {"step": step, "stopped": True, "loss": last_loss}
    except KeyboardInterrupt:
        # No barrier here: the other processes may be inside a collective and never reach it.
        _checkpoint(info, run_dir, step, model, trainable, parts, data_state, early, totals, cfg.keep_last, sync=False)
        say(f"\ninterrupted: checkpoint saved at step {step}; continue with --resume {run_dir}")
        raise
    finally:
        bar.close()

    after = evaluate(model, objective, data, recipe, tokenizer)
    result = {"step": step, "loss": last_loss, "after": after, "before": before, "run_dir": str(run_dir)}
    if info.is_main:
        if log:
            log.log({"step": step, **{f"eval_{k}": v for k, v in after.items()}})
        delta_dir = run_dir / ("adapter" if hasattr(model, "save_delta") else "model")
        if hasattr(model, "save_delta"):
            model.save_delta(delta_dir)  # atomic itself
        else:
            with atomic_dir(delta_dir) as tmp:  # a crash mid-write leaves the previous model, never half of one
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
        plot_loss_curve(log.rows, run_dir / "loss.png", f"{recipe.model.name} · {recipe.output.name}")
        log.close()
        write_ledger(run_dir, cost_ledger(model, trainable, delta_dir, step, totals))
        result.update(adapter=str(delta_dir), plot=str(run_dir / "loss.png"), cost=str(run_dir / LEDGER_FILE))
        write_json_atomic(run_dir / "summary.json", result)
    barrier(info)
    return result


def cost_ledger(model, trainable: list[str], saved_dir: Path, steps: int, totals: dict) -> CostLedger:
    """What the run cost; ``stored_params`` counts the tensors actually saved (the delta, or the whole model)."""
    params = dict(model.named_parameters())
    return CostLedger(trainable_params=sum(params[n].numel() for n in trainable if n in params),
                      total_params=sum(p.numel() for p in params.values()), stored_params=stored_parameters(saved_dir),
                      delta_bytes=directory_bytes(saved_dir), train_seconds=totals["train_seconds"], steps=steps,
                      tokens=totals["tokens"], examples=totals["examples"], peak_rss_mb=peak_rss_mb())


def batch_examples(batch: dict) -> int:
    """Examples in a collated batch (a packed row holds several: its ``lengths``)."""
    if "lengths" in batch:
        return sum(len(row) for row in batch["lengths"])
    return int(batch["input_ids"].shape[0])


def real_tokens(batch: dict) -> int:
    """Non-padding tokens of a collated batch (packed rows list their example lengths)."""
    if "lengths" in batch:
        return sum(sum(row) for row in batch["lengths"])
    return int(batch["attention_mask"].sum())


def _checkpoint(info: DistInfo, run_dir, step, model, trainable, parts, data_state, early, totals, keep_last, sync=True) -> None:
    if info.is_main:
        ckpt.save_checkpoint(run_dir, step, model, trainable, parts, {"data": data_state, "early": early, "totals": totals}, keep_last)
    if sync:
        barrier(info)


def _should_stop(metrics: dict, early: dict, patience: int | None) -> bool:
    """Track the primary metric; True after ``patience`` evaluations without improvement."""
    if not patience:
        return False
    key, higher = primary_metric(metrics)
    value = metrics[key] if higher else -metrics[key]
    if early["best"] is None or value > early["best"]:
        early["best"], early["bad_evals"] = value, 0
        return False
    early["bad_evals"] += 1
    return early["bad_evals"] >= patience


def primary_metric(metrics: dict) -> tuple[str, bool]:
    """The metric that decides "better" and whether higher is better."""
    for key in ("exact_match", "accuracy"):
        if key in metrics:
            return key, True
    return "loss", False


@torch.no_grad()
def evaluate(model, objective, data, recipe: TrainRecipe, tokenizer) -> dict[str, float]:
    """Eval loss (perplexity for LM), accuracy + macro-F1 (classification), exact match."""
    from deltatune.train.evaluate import exact_match

    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    classification = recipe.model.task == "sequence-classification"
    if data.eval:
        collate = make_collator(tokenizer, packing=False, mask_dtype=next(model.parameters()).dtype)
        loss_sum, count, preds, labels = 0.0, 0, [], []
        device = next(model.parameters()).device
        for i, batch in enumerate(iter_batches(data.eval, recipe.eval.batch_size, collate)):
            if recipe.eval.max_batches and i >= recipe.eval.max_batches:
                break
            batch = to_device(batch, device)
            s, n = objective(batch)
            loss_sum, count = loss_sum + float(s), count + int(n)
            if classification:
                preds += predict_classes(model, batch)
                labels += batch["labels"].cpu().tolist()
        metrics["loss"] = loss_sum / max(count, 1)
        if classification:
            metrics.update(accuracy_and_macro_f1(preds, labels))
        else:
            metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
    if data.generation_examples:
        add_special = data.generation_examples[0]["add_special_tokens"]
        em = exact_match(model, tokenizer, data.generation_examples, max_new_tokens=recipe.eval.max_new_tokens,
                         batch_size=recipe.eval.batch_size, add_special_tokens=add_special, progress=recipe.train.progress)
        metrics["exact_match"] = em["exact_match"]
        if "numeric_accuracy" in em:
            metrics["numeric_accuracy"] = em["numeric_accuracy"]
    model.train(was_training)
    return metrics


def format_metrics(metrics: dict[str, float]) -> str:
    parts = []
    for key, value in metrics.items():
        parts.append(f"{key} {100 * value:.1f}%" if key in ("exact_match", "numeric_accuracy", "accuracy", "macro_f1") else f"{key} {value:.4f}")
    return ", ".join(parts)
