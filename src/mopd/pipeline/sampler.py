"""Stage 2: render each row's prompt once and sample the student's completions."""

from __future__ import annotations

import anyio
import structlog
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from mopd.backends.base import SamplingParams, StudentSampler
from mopd.concurrency import ConcurrencyController, take_queue_signal
from mopd.errors import BackendError
from mopd.metrics import Metrics
from mopd.pipeline.dispatcher import RouteAdmission
from mopd.pipeline.gate import StepGate
from mopd.pipeline.reader import RejectsFile
from mopd.tokenization import PromptRenderer
from mopd.types import Row, SampledGroup

log = structlog.get_logger(__name__)


async def sample_groups(
    receive_rows: ObjectReceiveStream[Row],
    send_groups: ObjectSendStream[SampledGroup],
    *,
    sampler: StudentSampler,
    renderer: PromptRenderer,
    params: SamplingParams,
    controller: ConcurrencyController,
    gate: StepGate,
    rejects: RejectsFile,
    metrics: Metrics,
    max_prompt_tokens: int | None,
    admission: RouteAdmission | None = None,
    dead_letters: RejectsFile | None = None,
) -> None:
    """Stage 2: for each row, admitted by its route, the gate and the controller, sample a group.

    With a resilience policy, a row whose route breaker is open is parked
    (see ``resilience.py``); :func:`release_parked_rows` sends it back into
    ``receive_rows`` once its teacher may be called again.
    """
    rows_gauge = metrics.queue_depth.labels(queue="rows")
    parking = admission is not None and admission.resilience is not None
    async with receive_rows, send_groups, anyio.create_task_group() as tg:
        async for row in receive_rows:
            # 1. Render and check the prompt before taking a slot.
            try:
                prompt_ids = renderer.encode(row.messages)
            except Exception as exc:  # noqa: BLE001 - a template error rejects only this row
                rejects.write_row(row, reason="template_failed", message=f"chat template failed: {exc}")
                continue
            if max_prompt_tokens is not None and len(prompt_ids) > max_prompt_tokens:
                rejects.write_row(
                    row, reason="prompt_too_long",
                    message=f"prompt has {len(prompt_ids)} tokens; at most {max_prompt_tokens} fit before "
                    "max_tokens in the context window",
                )
                continue

            # 2. A route whose breaker is open parks its rows before any student
            # work is spent on them.
            if parking and admission is not None and not admission.passes_breaker(row):
                if not admission.park(row):
                    dead_letter_row(row, dead_letters, waited=None)
                continue

            # 3. Take a credit of the row's route; a stalled route sheds its rows
            # here, before any student work is spent on them.
            if admission is not None and not await admission.admit(row):
                admission.abandon_probe(row)
                rejects.write_row(
                    row, reason="route_stalled",
                    message=f"the teacher of route {row.route!r} is marked stalled; replay this line once the "
                    "route recovers",
                )
                continue

            # 4. Wait for the policy gate, then for a concurrency slot.
            if not await gate.acquire():
                if admission is not None:
                    admission.release(row)
                log.info("sampler_admission_closed", row_id=row.row_id)
                break
            await controller.acquire()
            tg.start_soon(_sample_one, row, prompt_ids, send_groups, sampler, params, controller, gate, rejects,
                          admission)
            rows_gauge.set(receive_rows.statistics().current_buffer_used)


PARKED_POLL_SECONDS = 0.1
"""Seconds between two looks at the parked rows."""


async def release_parked_rows(
    send_rows: ObjectSendStream[Row],
    receive_rows: ObjectReceiveStream[Row],
    *,
    admission: RouteAdmission,
    gate: StepGate,
    dead_letters: RejectsFile,
    poll_seconds: float = PARKED_POLL_SECONDS,
) -> None:
    """Stage 2a: send parked rows back to the sampler once their route lets them through; dead-letter rows
    that waited too long.

    ``send_rows`` is a clone of the reader's stream into ``receive_rows``, so
    the sampler's input ends only when this stage closes it too.
    It closes once the gate closed on a stop request, or once all of these
    are true: the reader has finished, the sampler waits for input with nothing
    buffered, and no row is parked or has a route credit. A row in flight
    may still be parked, which is why credits count.
    """
    async with send_rows:
        while True:
            # 1. Dead letters, then one row that may go now.
            for row, waited in admission.take_expired():
                dead_letter_row(row, dead_letters, waited=waited)
            row = admission.take_ready()
            if row is not None:
                try:
                    await send_rows.send(row)
                except anyio.BrokenResourceError:
                    return
                continue
            if gate.closed:
                return

            # 2. Finished when nothing can be parked any more.
            stats = receive_rows.statistics()
            reader_done = stats.open_send_streams <= 1
            if (reader_done and stats.current_buffer_used == 0 and stats.tasks_waiting_receive > 0
                    and admission.idle()):
                return
            await anyio.sleep(poll_seconds)


def dead_letter_row(row: Row, dead_letters: RejectsFile | None, *, waited: float | None) -> None:
    """Write a row whose teacher stayed unavailable to the dead-letter file."""
    if waited is None:
        message = (f"the teacher of route {row.route!r} is unavailable and its parked rows are at the limit; "
                   "replay this line once the teacher is back")
    else:
        message = (f"the teacher of route {row.route!r} was unavailable for {waited:.1f} s, longer than "
                   "MOPD_DEAD_LETTER_SECONDS; replay this line once the teacher is back")
    if dead_letters is None:
        raise RuntimeError(f"row {row.row_id} must be dead-lettered but no dead-letter file is set")
    dead_letters.write_row(row, reason="teacher_unavailable", message=message)


async def _sample_one(
    row: Row,
    prompt_ids: tuple[int, ...],
    send_groups: ObjectSendStream[SampledGroup],
    sampler: StudentSampler,
    params: SamplingParams,
    controller: ConcurrencyController,
    gate: StepGate,
    rejects: RejectsFile,
    admission: RouteAdmission | None,
) -> None:
    # Latency is read on the event loop's clock, which a simulation may run on virtual time.
    started = anyio.current_time()
    outcome = "ok"
    try:
        samples = await sampler.sample(prompt_ids, params)
    except BackendError as exc:
        outcome = "overload" if exc.reason in {"overloaded", "timeout"} else "error"
        log.warning("student_sample_failed", row_id=row.row_id, reason=exc.reason, error=str(exc))
        rejects.write_row(row, reason=f"student_{exc.reason}", message=str(exc))
        gate.group_failed()
        if admission is not None:
            admission.release(row)
        return
    finally:
        controller.release(latency_seconds=anyio.current_time() - started, outcome=outcome,
                           queue_signal=take_queue_signal())

    versions = {s.policy_version for s in samples}
    group = SampledGroup(
        row=row, prompt_ids_T=prompt_ids, samples_S=tuple(samples), policy_version=min(versions),
        sampled_at=anyio.current_time(),
    )
    await send_groups.send(group)
