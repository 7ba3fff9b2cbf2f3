"""Online meta-learning (`trainer=online`): FTML (Finn, Rajeswaran, Kakade & Levine 2019) over a
seeded stream of tasks, with FTL, TOE and training from scratch beside it on the same tasks.

Round t (the protocol of section 4; Algorithm 1 with the practical meta-update of section 5):
the learner meets task t and adapts its prior w_t with the update procedure U_t, k =
algo.test_inner_steps SGD steps at algo.test_inner_lr on the first K examples of each class
(the learner's own `evaluate`, i.e. inner.py's adapt_steps), and is scored on the next Q, held
out: f_t(U_t(w_t)), the efficiency after k updates. Then the task joins the buffer and FTML moves
the prior towards argmin_w sum_{k<=t} f_k(U_k(w)) (eq. 5, the meta-leader) by trainer.meta_steps
steps of the outer optimiser (Adam) on the learner's own meta-gradient (algo=maml: Finn et al.
2017, eq. 2), each on trainer.meta_batch_size tasks drawn uniformly from the buffer, with their
support and query drawn afresh from their pools. So the prior that meets task t has seen tasks
0..t-1 and nothing of task t.

Beside it, on the same meetings, with U_t and trainer.joint_steps Adam steps (algo.outer_lr) a
round on trainer.meta_batch_size tasks:
- FTL (follow the leader, eq. 3, with the task's fine-tuning): one model trained on the plain
  losses of tasks 0..t-1 pooled, then U_t on task t;
- TOE (train on everything): one model trained on all the data available, task t's support set
  included, scored as it is (no task-specific update: conventional online learning);
- from scratch: a fresh initialisation for every task, trained on its support set alone
  (trainer.scratch_steps SGD steps at algo.test_inner_lr; default k).
The authors released no code. Their streams feed a task's data in batches and count the data
needed to reach a score; here each task comes with K shots and is scored after k updates. The
regret and results.json: records/online.py.
"""

from __future__ import annotations

import copy
import math
import signal
import sys
import time
from pathlib import Path

import torch
from torch.func import functional_call
from tqdm import tqdm

from metalearn.algos.bilevel.inner import Params, adapt_steps
from metalearn.algos.objectives import METRICS, loss_fn, score
from metalearn.config import as_dict
from metalearn.data.stream import TaskStream, task_seed
from metalearn.data.tasks import Split, TaskBatch
from metalearn.distributed import SINGLE, Group
from metalearn.errors import ConfigError, TrainingError
from metalearn.records import checkpoint
from metalearn.records.logger import Logger
from metalearn.records.online import finish_online, hindsight
from metalearn.run import Run
from metalearn.train.faults import grads_finite, kept, nonfinite_fault
from metalearn.train.schedule import outer_optimizer
from metalearn.train.signals import StopRequest, stop_on_signals
from metalearn.train.state import JOINT, Online, online_state, restore_online


def start(run: Run, run_dir: Path) -> Online:
    """Draw the stream and build the methods from the network's initial weights w_1, or restore
    them all from last.pt when trainer.resume finds one."""
    trainer, algo = run.config.trainer, run.config.algo
    seed = trainer.seed_of_stream(run.config.seed)
    stream = TaskStream.draw(run.tasks, trainer.tasks, run.test_shape[0], trainer.pool, seed)
    optimizer = outer_optimizer(algo, run.algo, trainer.optimizer, trainer.hypergrad_lr)
    first = {k: v.detach() for k, v in run.model.named_parameters()}  # w_1, shared by all
    joint = {m: {k: v.clone().requires_grad_() for k, v in first.items()} for m in JOINT}
    adams = {m: torch.optim.Adam(list(p.values()), lr=algo.outer_lr) for m, p in joint.items()}
    generator = torch.Generator().manual_seed(run.config.seed)
    blank = copy.deepcopy(run.model).cpu()
    at = Online(stream, optimizer, joint, adams, generator, blank)
    last = run_dir / "checkpoints" / "last.pt"
    if trainer.resume and checkpoint.exists(last):
        restore_online(run, at, last)
    return at


def train_online(run: Run, run_dir: Path, group: Group = SINGLE) -> dict:
    """Play the stream (fresh, or resumed from last.pt) with its log in metrics.jsonl and W&B,
    then return results.json's dict (records/online.py writes it, with plots/online.png)."""
    if group.world > 1:
        raise ConfigError("trainer=online runs in one process: start it without torchrun")
    at = start(run, run_dir)
    resumed = at.standing.rounds if at.resumed else None
    options = {"run_name": run.name, "config": run.config_dict, "resume_step": resumed}
    logger = Logger(run.config.logger, run_dir, **options)
    try:
        results = run_stream(run, at, run_dir, logger)
    except BaseException:
        logger.close(exit_code=1)
        raise
    logger.close()
    return results


def run_stream(run: Run, at: Online, run_dir: Path, logger: Logger) -> dict:
    """Play the stream's remaining rounds, then score the hindsight comparator and write
    results.json and plots/online.png. A stop signal saves last.pt after the round it came in
    and then takes its usual course."""
    with stop_on_signals() as stop:
        play(run, at, logger, run_dir, stop)
    if stop.signum is not None:
        print(
            f"\n{signal.Signals(stop.signum).name}: saved {run_dir / 'checkpoints' / 'last.pt'} "
            f"after round {at.standing.rounds}; continue with trainer.resume=true "
            f"hydra.run.dir={run_dir}",
            file=sys.stderr,
            flush=True,
        )
        logger.close(exit_code=1)
        signal.raise_signal(stop.signum)
        raise SystemExit(128 + stop.signum)  # a handler that returned: stop all the same
    best = hindsight(run, at.stream, at.standing.rounds)  # the regret's comparator
    return finish_online(run, at.records, best, as_dict(at.standing), run_dir, logger)


def play(run: Run, at: Online, logger: Logger, run_dir: Path, stop: StopRequest) -> None:
    """The rounds, one task each, from where `at` stands; last.pt every trainer.checkpoint_every
    rounds, after the last one, when the time budget is spent and at a stop signal."""
    trainer = run.config.trainer
    budget = math.inf if trainer.max_minutes is None else 60.0 * trainer.max_minutes
    shown = trainer.progress
    bar = tqdm(total=trainer.tasks, initial=at.standing.rounds, desc=run.name, disable=not shown)
    while at.standing.rounds < trainer.tasks:
        started = time.perf_counter()
        values = play_round(run, at, run_dir)
        spent = time.perf_counter() - started
        at.standing.rounds += 1
        at.standing.seconds += spent
        logger.log(values | {"perf/seconds_per_round": spent}, step=at.standing.rounds)
        bar.update()
        over = at.standing.seconds >= budget
        if over:
            at.standing.stopped_by = "max_minutes"
        last = at.standing.rounds == trainer.tasks or over or stop.signum is not None
        if last or at.standing.rounds % trainer.checkpoint_every == 0:
            checkpoint.save(run_dir / "checkpoints" / "last.pt", online_state(run, at))
        if over or stop.signum is not None:
            break
    bar.close()


def play_round(run: Run, at: Online, run_dir: Path) -> dict[str, float]:
    """Round t: every method meets task t and is scored; the task joins the buffer; FTML and
    FTL learn from the buffer. Returns the round's metrics (online/<method>_<metric>, ...)."""
    index, (_, shots, query) = at.standing.rounds, run.test_shape
    meeting = at.stream.meeting(torch.tensor([index]), shots, query)
    toe_loss = joint_steps(run, at, "toe", run_dir, meeting.support)  # TOE trains on it first
    scored = meet(run, at, meeting, index)
    at.buffer.append(index)
    meta_loss = ftml_update(run, at, run_dir)
    ftl_loss = joint_steps(run, at, "ftl", run_dir)
    short, values = METRICS[run.metric].short, {}
    for method, (loss, value) in scored.items():
        at.records[method]["loss"].append(loss)
        at.records[method]["score"].append(value)
        values |= {f"online/{method}_{short}": value, f"online/{method}_loss": loss}
    return values | {
        "train/meta_loss": meta_loss,
        "train/ftl_loss": ftl_loss,
        "train/toe_loss": toe_loss,
        "online/buffer": len(at.buffer),
    }


def meet(run: Run, at: Online, meeting: TaskBatch, index: int) -> dict[str, tuple[float, float]]:
    """Each method's (loss, score) on the met task's held-out query after its update on the
    task's support set: FTML's prior and FTL's model after k steps (U_t), TOE's model as it is,
    a fresh initialisation after trainer.scratch_steps."""
    k, trainer = run.test_steps, run.config.trainer
    scratch = fresh(run, at, index)
    run.model.train(False)  # as at test: no dropout or DropBlock
    try:
        with run.autocast():
            out = run.algo.evaluate(meeting, [k])
            return {
                "ftml": (out["loss"][0, 0].item(), out["score"][0, 0].item()),
                "ftl": adapted(run, at.joint["ftl"], meeting, k),
                "toe": adapted(run, at.joint["toe"], meeting, 0),
                "scratch": adapted(run, scratch, meeting, trainer.scratch_steps or k),
            }
    finally:
        run.model.train(True)


def adapted(run: Run, params: Params, meeting: TaskBatch, steps: int) -> tuple[float, float]:
    """Loss and score on the met task's query after `steps` SGD steps from `params` on its
    support set at the learner's test-time rate (adapt_steps, as every learner of the family)."""
    _, buffers = run.algo.params()
    objective, kind = loss_fn(run.tasks.kind), run.tasks.kind
    support = Split(meeting.support.x[0], meeting.support.y[0])  # (N * K, ...)
    start_at = {k: v.detach() for k, v in params.items()}
    with torch.no_grad():  # the inner torch.func.grad still works; no outer graph is kept
        *_, fast = adapt_steps(
            run.model,
            start_at,
            buffers,
            support,
            steps=steps,
            lr=run.config.algo.test_inner_lr,
            first_order=True,
            loss=objective,
        )
        prediction = functional_call(run.model, (fast, buffers), (meeting.query.x[0],))
    target = meeting.query.y[0]
    return objective(prediction, target).item(), score(kind, prediction, target).item()


def fresh(run: Run, at: Online, index: int) -> Params:
    """A new random initialisation of the network for task `index` (from scratch): every layer's
    own initialiser (torch's reset_parameters), seeded by the task's index."""
    with torch.random.fork_rng(devices=[]):  # the blank copy lives on the CPU
        torch.manual_seed(task_seed(run.config.seed + 1, index))  # not the build's seed
        for module in at.blank.modules():
            if hasattr(module, "reset_parameters"):  # torch's layers: Linear, Conv2d, ...
                module.reset_parameters()
    return {k: v.detach().to(run.device) for k, v in at.blank.named_parameters()}


def ftml_update(run: Run, at: Online, run_dir: Path) -> float:
    """FTML's Meta-Update (Algorithm 1): trainer.meta_steps outer steps on the learner's
    meta-gradient, each over tasks drawn uniformly from the buffer; the mean meta-loss."""
    trainer, (_, shots, query) = run.config.trainer, run.train_shape
    params = [p for p in run.algo.parameters() if p.requires_grad]
    buffer, losses = torch.tensor(at.buffer), []
    for _ in range(trainer.meta_steps):
        picks = torch.randint(len(buffer), (trainer.meta_batch_size,), generator=at.generator)
        batch = at.stream.draw_batch(buffer[picks], at.generator, shots, query)
        updates = run.algo.meta_losses(batch, at.standing.meta_steps)
        while True:
            at.optimizer.zero_grad(set_to_none=True)
            with run.autocast():
                update = next(updates, None)
            if update is None:
                break
            loss = update[0]
            loss.backward()
            if not torch.stack([torch.isfinite(loss), *grads_finite(params)]).all().item():
                fault = nonfinite_fault(run, batch, loss.detach(), at.standing.meta_steps + 1)
                raise TrainingError(
                    f"FTML, round {at.standing.rounds + 1}: {fault}; {kept(run_dir)}"
                )
            if trainer.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, trainer.clip_grad_norm)
            at.optimizer.step()
            losses.append(loss.detach().float())
        at.standing.meta_steps += 1
    return torch.stack(losses).mean().item()


def joint_steps(
    run: Run, at: Online, method: str, run_dir: Path, current: Split | None = None
) -> float:
    """Joint training of FTL's or TOE's model: trainer.joint_steps Adam steps on the plain loss
    (no adaptation) of tasks drawn uniformly from the buffer, each its support and query set
    (with `current`, TOE's: the met task's support set is one task more); the mean loss."""
    trainer, (_, shots, query) = run.config.trainer, run.train_shape
    params, optimizer = at.joint[method], at.joint_optimizers[method]
    _, buffers = run.algo.params()
    objective, buffer = loss_fn(run.tasks.kind), torch.tensor(at.buffer, dtype=torch.long)
    losses = []
    for _ in range(trainer.joint_steps or trainer.meta_steps):
        seen = len(buffer) + (current is not None)
        picks = torch.randint(seen, (trainer.meta_batch_size,), generator=at.generator)
        old = buffer[picks[picks < len(buffer)]]
        examples = []
        if current is not None:  # TOE: the met task's support set, as often as it was drawn
            examples += [(current.x[0], current.y[0])] * int((picks == len(buffer)).sum())
        if len(old):
            batch = at.stream.draw_batch(old, at.generator, shots, query)
            s, q = batch.support, batch.query
            examples += [
                (torch.cat([s.x[i], q.x[i]]), torch.cat([s.y[i], q.y[i]])) for i in range(len(old))
            ]
        optimizer.zero_grad(set_to_none=True)
        with run.autocast():  # one forward per task: BatchNorm sees one task's batch, as at test
            loss = torch.stack(
                [
                    objective(functional_call(run.model, (params, buffers), (x,)), y)
                    for x, y in examples
                ]
            ).mean()
        if not torch.isfinite(loss).item():
            raise TrainingError(
                f"{method.upper()}'s joint-training loss became {loss.item()} in round "
                f"{at.standing.rounds + 1}; {kept(run_dir, 'lower algo.outer_lr')}"
            )
        loss.backward()
        optimizer.step()
        losses.append(loss.detach().float())
    return torch.stack(losses).mean().item()
