"""The backend is chosen per thread: use_backend blocks in concurrent threads do not see or undo
each other's choice, and a backward runs under its forward's backend on whatever thread runs it."""
import threading

import torch

import fastgen
from fastgen.ops.registry import Implementation, use_backend
from fastgen.ops.shortcut import CHANNEL_DUP_PIXEL_SHUFFLE, PIXEL_UNSHUFFLE_CHANNEL_AVG, pixel_unshuffle_channel_avg

# Long enough for a thread that misses its signal to fail the test instead of hanging it.
TIMEOUT_S = 60


def _run_threads(targets: dict) -> None:
    """Run each target on its own thread, named by its key; re-raise the first exception one of
    them raised."""
    errors = []

    def guarded(target):
        try:
            target()
        except BaseException as error:  # noqa: BLE001  (handed to the test's thread below)
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(target,), name=name) for name, target in targets.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
        assert not thread.is_alive(), "a thread is still waiting for its signal"
    if errors:
        raise errors[0]


def _wait(event: threading.Event) -> None:
    assert event.wait(TIMEOUT_S), "the other thread never signalled"


def test_blocks_closing_out_of_order_in_two_threads_keep_their_own_backend():
    """Thread A enters "triton", thread B enters "reference", A leaves while B is still inside."""
    a_entered, b_entered, a_left = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        with use_backend("triton"):
            a_entered.set()
            _wait(b_entered)
            seen["A inside, B inside too"] = fastgen.current_backend()
        seen["A after its block"] = fastgen.current_backend()
        a_left.set()

    def thread_b():
        _wait(a_entered)
        with use_backend("reference"):
            b_entered.set()
            _wait(a_left)
            seen["B inside, A left"] = fastgen.current_backend()
        seen["B after its block"] = fastgen.current_backend()

    _run_threads({"A": thread_a, "B": thread_b})
    assert seen == {"A inside, B inside too": "triton", "A after its block": "auto",
                    "B inside, A left": "reference", "B after its block": "auto"}
    assert fastgen.current_backend() == "auto"


def _recording(op, backend: str, calls: list, during_call=lambda: None) -> Implementation:
    """op's `backend` implementation, recording (thread name, backend in force) for each call and
    running `during_call` before it computes."""
    implementation = op.implementations[backend]

    def run(*args, out):
        calls.append((threading.current_thread().name, fastgen.current_backend()))
        during_call()
        implementation.run(*args, out=out)

    return Implementation(backend, run, implementation.dtypes)


def test_a_backward_in_one_thread_leaves_another_threads_forwards_on_their_backend(monkeypatch):
    """Thread A's backward runs under "reference" (its forward's backend) and pauses in the middle
    while thread B, inside use_backend("triton"), runs a forward: B's forward runs triton."""
    backward_running, b_done = threading.Event(), threading.Event()
    adjoint_calls, forward_calls = [], []

    def pause_backward():
        backward_running.set()
        _wait(b_done)

    reference_adjoint = CHANNEL_DUP_PIXEL_SHUFFLE.reference

    def recording_reference_adjoint(*args):
        adjoint_calls.append((threading.current_thread().name, fastgen.current_backend()))
        pause_backward()
        return reference_adjoint(*args)

    monkeypatch.setattr(CHANNEL_DUP_PIXEL_SHUFFLE, "reference", recording_reference_adjoint)
    monkeypatch.setitem(PIXEL_UNSHUFFLE_CHANNEL_AVG.implementations, "triton",
                        _recording(PIXEL_UNSHUFFLE_CHANNEL_AVG, "triton", forward_calls))
    x = torch.randn(1, 4, 4, 4, requires_grad=True)
    b_inside = threading.Event()
    seen = {}

    def thread_a():
        _wait(b_inside)
        with use_backend("reference"):
            y = pixel_unshuffle_channel_avg(x, 2, 8)
            y.backward(torch.ones_like(y))

    def thread_b():
        with use_backend("triton"):
            b_inside.set()
            _wait(backward_running)
            pixel_unshuffle_channel_avg(x.detach(), 2, 8)
            seen["B during A's backward"] = fastgen.current_backend()
        b_done.set()

    _run_threads({"A": thread_a, "B": thread_b})
    assert adjoint_calls == [("A", "reference")]
    assert forward_calls == [("B", "triton")]
    assert seen == {"B during A's backward": "triton"}
    assert fastgen.current_backend() == "auto"


def test_backward_from_another_thread_after_the_block_runs_the_forward_backend(monkeypatch):
    """What autograd does on CUDA, where backward runs on its own worker thread: that thread never
    entered the forward's use_backend block, and the block has closed anyway."""
    adjoint_calls = []
    monkeypatch.setitem(CHANNEL_DUP_PIXEL_SHUFFLE.implementations, "triton",
                        _recording(CHANNEL_DUP_PIXEL_SHUFFLE, "triton", adjoint_calls))
    x = torch.randn(1, 4, 4, 4, requires_grad=True)
    with use_backend("triton"):
        y = pixel_unshuffle_channel_avg(x, 2, 8)
    seen = {}

    def backward_thread():
        y.backward(torch.ones_like(y))
        seen["after the backward"] = fastgen.current_backend()

    _run_threads({"backward": backward_thread})
    assert adjoint_calls == [("backward", "triton")]
    assert seen == {"after the backward": "auto"}
