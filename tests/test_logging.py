"""``fusedadapters.utils.logging`` behaves as NeMo's ``nemo.utils.logging`` where NeMo's adapter tests drive it.

The first test mirrors NeMo's ``test_base_model_no_support_for_adapters``
(``tests/core/mixins/adapters/test_adapter_model_mixin.py``): a model whose encoder has no adapter
support warns once, through ``logging.warning(..., mode=logging_mode.ONCE)``, and the test drives the
logger as NeMo's (``_logger.propagate``, ``get_verbosity``, ``set_verbosity``, caplog).
"""

import logging as stdlib_logging
import uuid

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from fusedadapters import ModelPT, NeuralModule
from fusedadapters.adapter_mixins import AdapterModelPTMixin, AdapterModuleMixin
from fusedadapters.adapter_modules import LinearAdapter
from fusedadapters.targets import class_path
from fusedadapters.utils import instantiate, logging, logging_mode


class PlainModule(NeuralModule):
    """A module without adapter support."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(20, 20)

    def forward(self, x):
        return self.fc(x)


class EncoderModel(ModelPT, AdapterModelPTMixin):
    """NeMo's test model, cut to its encoder: forwards add_adapter and warns when the encoder cannot hold adapters."""

    unsupported_message = "Encoder does not support adapters !"

    def __init__(self, cfg, trainer=None):
        super().__init__(cfg, trainer=trainer)
        self.encoder = instantiate(cfg.encoder)
        if isinstance(self.encoder, AdapterModuleMixin):
            self.setup_adapters()

    def add_adapter(self, name, cfg):
        super().add_adapter(name, cfg)
        self.encoder.add_adapter(name, cfg)  # AttributeError when the encoder has no adapter support

    def get_enabled_adapters(self):
        names = super().get_enabled_adapters()
        if isinstance(self.encoder, AdapterModuleMixin):
            names += self.encoder.get_enabled_adapters()
        return names

    def check_valid_model_with_adapter_support_(self):
        global_cfg = self.adapter_cfg.get(self.adapter_global_cfg_key, DictConfig({}))
        if global_cfg.get("encoder_adapter", True) and not isinstance(self.encoder, AdapterModuleMixin):
            logging.warning(self.unsupported_message, mode=logging_mode.ONCE)


@pytest.fixture
def nemo_style_logging(caplog):
    """The set-up and tear-down NeMo's test does around its body."""
    logging._logger.propagate = True
    original_verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)
    caplog.set_level(logging.WARNING)
    yield caplog
    logging._logger.propagate = True
    logging.set_verbosity(original_verbosity)


def test_base_model_no_support_for_adapters(nemo_style_logging, monkeypatch):
    caplog = nemo_style_logging
    message = f"Encoder does not support adapters ! ({uuid.uuid4().hex})"  # ONCE is process-wide
    monkeypatch.setattr(EncoderModel, "unsupported_message", message)
    model = EncoderModel(OmegaConf.create({"encoder": {"_target_": class_path(PlainModule)}}))
    adapter_cfg = {"_target_": class_path(LinearAdapter), "in_features": 20, "dim": 4}

    with pytest.raises(AttributeError):
        model.add_adapter(name="adapter_0", cfg=adapter_cfg)
    assert message in caplog.text

    caplog.clear()
    model.get_enabled_adapters()
    assert message not in caplog.text  # logged once


def test_once_counts_only_messages_that_were_emitted(caplog):
    message = f"shown once the verbosity allows it ({uuid.uuid4().hex})"
    caplog.set_level(logging.DEBUG)
    with logging.temp_verbosity(logging.ERROR):
        logging.warning(message, mode=logging_mode.ONCE)
    assert message not in caplog.text
    with logging.temp_verbosity(logging.WARNING):
        logging.warning(message, mode=logging_mode.ONCE)
        logging.warning(message, mode=logging_mode.ONCE)
    assert caplog.text.count(message) == 1


def test_every_is_the_default_mode(caplog):
    message = f"every time ({uuid.uuid4().hex})"
    caplog.set_level(logging.WARNING)
    with logging.temp_verbosity(logging.WARNING):
        logging.warning(message)
        logging.warning(message)
    assert caplog.text.count(message) == 2


def test_verbosity_sets_the_logger_and_its_handlers():
    handler = stdlib_logging.NullHandler()
    logging._logger.addHandler(handler)
    original = logging.get_verbosity()
    try:
        logging.set_verbosity(logging.ERROR)
        assert logging.get_verbosity() == logging.ERROR == logging.getEffectiveLevel()
        assert logging._logger.level == handler.level == logging.ERROR
        with logging.temp_verbosity(logging.DEBUG):
            assert logging.get_verbosity() == logging.DEBUG and handler.level == logging.DEBUG
        assert logging.get_verbosity() == logging.ERROR
    finally:
        logging._logger.removeHandler(handler)
        logging.set_verbosity(original)


def test_levels_are_the_standard_ones():
    assert (logging.NOTSET, logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL) == (
        0, 10, 20, 30, 40, 50)
    assert isinstance(logging._logger, stdlib_logging.Logger) and logging._logger.name == "fusedadapters"


def test_records_name_the_caller(caplog):
    caplog.set_level(logging.WARNING)
    with logging.temp_verbosity(logging.WARNING):
        logging.warning("where from")
    (record,) = [r for r in caplog.records if r.getMessage() == "where from"]
    assert record.filename == "test_logging.py"
