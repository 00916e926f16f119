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
) -> None:
    """Stage 2: for each row, admitted by its route, the gate and the controller, sample a group."""
    rows_gauge = metrics.queue_depth.labels(queue="rows")
    async with receive_rows, send_groups, anyio.create_task_group() as tg:
        async for row in receive_rows:
            # 1. Render and check the prompt before taking a slot.
            try:
                prompt_ids = renderer.encode(row.messages)
            except Exception as exc:  # noqa: BLE001 - a template error rejects only this row
                rejects.write(reason="template_failed", message=f"chat template failed: {exc}",
                              source=row.source, line_number=row.line_number)
                continue
            if max_prompt_tokens is not None and len(prompt_ids) > max_prompt_tokens:
                rejects.write(
                    reason="prompt_too_long",
                    message=f"prompt has {len(prompt_ids)} tokens; at most {max_prompt_tokens} fit before "
                    "max_tokens in the context window",
                    source=row.source, line_number=row.line_number,
                )
                continue

            # 2. Take a credit of the row's route; a stalled route sheds its rows
            # here, before any student work is spent on them.
            if admission is not None and not await admission.admit(row):
                rejects.write(
                    reason="route_stalled",
                    message=f"the teacher of route {row.route!r} is marked stalled; replay this line once the "
                    "route recovers",
                    source=row.source, line_number=row.line_number,
                )
                continue

            # 3. Wait for the policy gate, then for a concurrency slot.
            if not await gate.acquire():
                if admission is not None:
                    admission.release(row)
                log.info("sampler_admission_closed", row_id=row.row_id)
                break
            await controller.acquire()
            tg.start_soon(_sample_one, row, prompt_ids, send_groups, sampler, params, controller, gate, rejects,
                          admission)
            rows_gauge.set(receive_rows.statistics().current_buffer_used)


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
        rejects.write(reason=f"student_{exc.reason}", message=str(exc), source=row.source, line_number=row.line_number)
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
