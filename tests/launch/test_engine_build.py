"""The engine server builds its engine on a thread that exits, never on the serving thread."""

import threading

import pytest

from microserve.config import EngineConfig
from microserve.errors import UserError
from microserve.launch import engine as launch_engine


def test_engine_is_built_off_the_calling_thread_and_returned(tiny_llama, monkeypatch):
    builders = []

    class Recording(launch_engine.LLMEngine):
        def __init__(self, cfg):
            builders.append(threading.current_thread())
            super().__init__(cfg)

    monkeypatch.setattr(launch_engine, "LLMEngine", Recording)
    engine = launch_engine._build_engine(EngineConfig(model=str(tiny_llama), num_threads=1))
    assert isinstance(engine, Recording)
    assert builders and builders[0] is not threading.current_thread()
    assert not builders[0].is_alive()  # its OpenMP pool went with it


def test_a_build_error_reaches_the_caller(tmp_path):
    with pytest.raises(UserError):
        launch_engine._build_engine(EngineConfig(model=str(tmp_path / "missing.gguf")))
