"""NeMo's adapter tutorial, ported to fusedadapters by changing its imports and nothing else.

The code cells of NeMo's adapter tutorial notebook (NVIDIA/NeMo, ``tutorials/``) in order, with ``nemo``/``hydra`` imports pointed at
``fusedadapters`` and the notebook's shell lines (``!pip``, ``!ls``, ``!du``) dropped. It writes
``full_model.nemo`` and ``adapters.pt`` to the current directory. Run it with
``python examples/adapter_tutorial.py``; ``tests/test_tutorial.py`` runs it and checks each claim.
"""
import os

os.environ.setdefault("PAGER", "cat")  # the tutorial calls help(); print it instead of paging

import torch
import torch.nn as nn
from fusedadapters import NeuralModule, ModelPT

from fusedadapters.utils import instantiate
from omegaconf import DictConfig, OmegaConf

class MLP(torch.nn.Module):
    def __init__(self, dim: int = 50):
        super().__init__()

        self.fc = torch.nn.Linear(dim, dim)
        self.ln = torch.nn.LayerNorm(dim)

    def forward(self, x):
        x = self.fc(x)
        x = self.ln(x)
        return x

class ResidualMLP(torch.nn.Module):
  def __init__(self, dim: int, num_layers: int):
    super().__init__()

    self.dim = dim
    self.num_layers = num_layers
    self.layers = nn.ModuleList([MLP(dim) for _ in range(num_layers)])
  
  def forward(self, x):
    input = x
    for layer in self.layers:
      x = layer(x)
      x = x + input
      input = x
    return x

class SimpleModel(ModelPT):
    def __init__(self, cfg, trainer=None):
        super().__init__(cfg, trainer=trainer)

        self.encoder = instantiate(cfg.encoder)  # type: ResidualMLP
        self.decoder = instantiate(cfg.decoder)  # type: ResidualMLP
        self.projection = nn.Linear(self.decoder.dim, cfg.out_features)

    def forward(self, x):
        y = self.encoder(x)
        z = self.decoder(y)
        out = self.projection(z)
        return out

    def list_available_models(cls):
        return []

    def setup_training_data(self, train_data_config):
        pass

    def setup_validation_data(self, val_data_config):
        pass

def get_classpath(cls):
    return f'{cls.__module__}.{cls.__name__}'

def get_model_config(dim=512):
    config = OmegaConf.create(
        {
            'in_features': dim,
            'out_features': 10,
            'encoder': {'_target_': get_classpath(ResidualMLP), 'dim': dim, 'num_layers': 4},
            'decoder': {'_target_': get_classpath(ResidualMLP), 'dim': dim, 'num_layers': 2},
        }
    )
    return config

dim = 512
model_cfg = get_model_config(dim)
model = SimpleModel(model_cfg)
model.summarize()

# Check if the forward pass works !
with torch.no_grad():
  input_data = torch.randn(8, dim)
  out = model(input_data)
  print(out.shape)

from fusedadapters import adapter_mixins

help(adapter_mixins.AdapterModuleMixin)

# NOTE: See the *two* classes being inherited here !
class MLP(torch.nn.Module, adapter_mixins.AdapterModuleMixin):
    def __init__(self, dim: int = 50):
        super().__init__()

        self.fc = torch.nn.Linear(dim, dim)
        self.ln = torch.nn.LayerNorm(dim)

    def forward(self, x):
        x = self.fc(x)
        x = self.ln(x)

        # The only necessary change to the module code !
        if self.is_adapter_available():
          x = self.forward_enabled_adapters(x)
        return x

    # add a utility method to calculate number of parameters (or we could simple extend nemo.core.NeuralModule instead)
    @property
    def num_weights(self):
      num: int = 0
      for p in self.parameters():
          if p.requires_grad:
              num += p.numel()
      return num

mlp = MLP(dim)

print(mlp)
print("Num trainable parameters (without adapters):", mlp.num_weights)

from fusedadapters import adapter_modules

# Next we look at one of the adapter modules - the LinearAdapter
linear_adapter = adapter_modules.LinearAdapter(in_features=dim, dim=5)
print(linear_adapter)

class SimpleModule(torch.nn.Module):
  def __init__(self, size: int):
    super().__init__()
    self.size = size
    self.model = torch.nn.Sequential(
        torch.nn.Linear(size, size, bias=False),
        torch.nn.Identity(),
    )
  
  def forward(self, x):
    return self.model(x)

# The earlier LinearAdapter has a simple ResidualAddStrategy
# Uncomment below to see the ResidualAddAdapterStrategy definition
# help(linear_adapter.adapter_strategy)

from fusedadapters import adapter_mixin_strategies

# Uncomment to see the definition of the AbstractAdapterStrategy
# help(adapter_mixin_strategies.AbstractAdapterStrategy)

class MultiplicationAdapterStrategy(adapter_mixin_strategies.AbstractAdapterStrategy):

  def __init__(self, scaling_factor: float = 1.0):
    super().__init__()
    self.scale = scaling_factor

  def forward(self, input: torch.Tensor, adapter: torch.nn.Module, *, module: 'AdapterModuleMixin'):
     # This is the forward method that takes in the previous input (here, its a tensor, but it can be a dictionary, a tuple, a class, anything really).
     # The second argument is the adapter that is currently being applied to this input
     # The final argument is the entire nn.Module that supports adapters.
     # In this case, the final argument would be the entire `MLP` module
     
     # Equivalent to f(x) = x * adapter(x)
     adapter_out = adapter(input)  # compute the adapter output from the input(s)
     result = input * adapter_out

     # Apply scaling factor. Equivalent to f(x) = scale * (x * adapter(x))
     result = self.scale * result
     return result

from dataclasses import dataclass

@dataclass
class MultiplicationAdapterStrategyConfig:
    scaling_factor: float = 1.0

    # mandatory field
    _target_: str = "{0}.{1}".format(
        MultiplicationAdapterStrategy.__module__, MultiplicationAdapterStrategy.__name__
    )  

class SimpleModuleAdapter(SimpleModule, adapter_modules.AdapterModuleUtil):

  def __init__(self, size: int, adapter_strategy: MultiplicationAdapterStrategy = None):
    """
    The input arguments should match the original module so you can pass the inputs to the module.
    It should also accept an adapter strategy.

    We will then use the method `setup_adapter_strategy()` to prepare the component to be used as an adapter.
    Note: Passing None to the strategy will let it pick a default strategy provided by the method
    `get_default_strategy_config()`.
    """
    super().__init__(size=size)

    # Prepare the adapter strategy
    self.setup_adapter_strategy(adapter_strategy)

    # Initialize the weights to be 0 at init
    self.reset_parameters()

  # Note: In this case, because we didn't add new modules, nor change how the original forward works
  # We dont need to subclass and override forward() !
  
  def reset_parameters(self):
    # We normally want an adapter at initialization to have no effect on the output
    # Therefore we replace the random uniform with a simple identity matrix, which will cause
    # the output of the adapter to match the input
    with torch.no_grad():
      self.model[0].weight = torch.nn.Parameter(torch.eye(self.size))
  

  def get_default_strategy_config(self) -> 'dataclass':
    """
    Make the default adapter strategy of this component be the `MultiplicationAdapterStrategy()`  
    """
    return MultiplicationAdapterStrategyConfig()

simple_adapter = SimpleModuleAdapter(size=5)
multiplication_strategy = simple_adapter.adapter_strategy
x = torch.randn(1, 5)
adapter_x = simple_adapter(x)
output = multiplication_strategy(input=x, adapter=simple_adapter, module=None)  # Normally you would pass the module here, but in this example can be skipped.
print("Original input :", x)
print("Adapter output :", adapter_x)
print("Strategy output:", output)

from typing import Optional

@dataclass
class SimpleModuleAdapterConfig:
    size: int
    adapter_strategy: Optional[MultiplicationAdapterStrategyConfig] = None

    # mandatory field
    _target_: str = "{0}.{1}".format(
        SimpleModuleAdapter.__module__, SimpleModuleAdapter.__name__
    )  

mlp.add_adapter(name='adapter_1', cfg=adapter_modules.LinearAdapterConfig(in_features=dim, dim=5))

# Now check the new parameter count of this MLP module, it should be higher than the previous count
print("New param count :", mlp.num_weights)

# Uncomment to see the error message - 
# mlp.add_adapter(name='adapter_1', cfg=adapter_modules.LinearAdapterConfig(in_features=dim, dim=10))

mlp.get_enabled_adapters()

# Disable all adapters
mlp.set_enabled_adapters(enabled=False)
print("Enabled adapters :", mlp.get_enabled_adapters())

# Enable just one adapter
mlp.set_enabled_adapters(name="adapter_1", enabled=True)
print("Enabled adapters :", mlp.get_enabled_adapters())

mlp.is_adapter_available()

# Check `forward_enabled_adapters()`
out = mlp.forward_enabled_adapters(input_data)
print(out.shape)

# Check `forward_single_enabled_adapter_()`
adapter_name = mlp.get_enabled_adapters()[0]  # we have enabled just one adapter
adapter_module = mlp.adapter_layer[adapter_name]  # get the adapter module with this name
adapter_strategy = adapter_module.adapter_strategy  # get the adapter strategy for this adapter

out = mlp.forward_single_enabled_adapter_(input_data, adapter_module, adapter_name=adapter_name, adapter_strategy=adapter_strategy)
print(out.shape)

# First setup some utility functions (this is part of NeuralModule)
def freeze(m):
    for param in m.parameters():
      param.requires_grad = False
    m.eval()

def unfreeze(m):
    for param in m.parameters():
      param.requires_grad = True
    m.train()

freeze(mlp)
print("MLP frozen params :", mlp.num_weights)

# Check `unfreeze_enabled_adapters()` - param count should be lower than the previous total (original + adapter)
mlp.unfreeze_enabled_adapters()
print("MLP unfrozen adapter params :", mlp.num_weights)

# NOTE: We subclass the original ResidualMLP, and add in the AdapterModuleMixin too
class ResidualMLPAdapter(ResidualMLP, adapter_mixins.AdapterModuleMixin):
  pass

from typing import List, Optional

class ResidualMLPAdapter(ResidualMLP, adapter_mixins.AdapterModuleMixin):
  def add_adapter(self, name: str, cfg: DictConfig):
      # call the same method on each `MLP` layer, collecting results
      for layer in self.layers:
        layer.add_adapter(name, cfg)
      
  def get_enabled_adapters(self) -> List[str]:
      # call the same method on each `MLP` layer, collecting results
      enabled_adapters = set([])
      for layer in self.layers:
        names = layer.get_enabled_adapters()
        enabled_adapters.update(names)
      return list(enabled_adapters)
  
  def set_enabled_adapters(self, name: Optional[str], enabled: bool):
      # call the same method on each `MLP` layer, collecting results
      for layer in self.layers:
        layer.set_enabled_adapters(name, enabled)
  
  def is_adapter_available(self) -> bool:
      # call the same method on each `MLP` layer, collecting results
      is_available = any([layer.is_adapter_available() for layer in self.layers])
      return is_available

if adapter_mixins.get_registered_adapter(ResidualMLP) is None:
  adapter_mixins.register_adapter(ResidualMLP, ResidualMLPAdapter)

class SimpleModelAdapter(adapter_mixins.AdapterModelPTMixin):
  pass

help(adapter_mixins.AdapterModelPTMixin)

# Import the class explicitly to make instance checks easier
from fusedadapters.adapter_mixins import AdapterModuleMixin

class SimpleModelAdapterSetupAdapters(SimpleModelAdapter):
  def setup_adapters(self):
    # First check that any of the modules support adapters or not
    supports_adapters = False

    # Check the inheriting class' modules supports adapters or not
    if hasattr(self, 'encoder') and isinstance(self.encoder, AdapterModuleMixin):
        supports_adapters |= True

    if hasattr(self, 'decoder') and isinstance(self.decoder, AdapterModuleMixin):
        supports_adapters |= True

    # If any class supports it, try to restore adapters
    if supports_adapters:
        super().setup_adapters()

class SimpleModelAdapterAddAdapter(SimpleModelAdapterSetupAdapters):

  def add_adapter(self, name: str, cfg: DictConfig):
      # Setup the config first. At the model level, super does not automatically call any of the subclass methods
      # It just sets up the model.cfg for users
      super().add_adapter(name, cfg)

      # Resolve module name and adapter name
      module_name, adapter_name = self.resolve_adapter_module_name_(name)

      # Try to retrieve global adapter config
      global_config = self._get_global_cfg()

      # forward the method call to the individual modules
      # If module name is empty, it is a default and global adapter, otherwise it is a module adapter
      if (module_name == '' and global_config.get('encoder_adapter', True)) or (module_name == 'encoder'):
          self.encoder.add_adapter(name, cfg)

      if (module_name == '' and global_config.get('decoder_adapter', False)) or (module_name == 'decoder'):
          self.decoder.add_adapter(name, cfg)
    
  def resolve_adapter_module_name_(self, name: str) -> (str, str):
      # resolve name and module
      module_name, adapter_name = super().resolve_adapter_module_name_(name)

      # '' as module name means "default module"
      # assert that the module name (if provided) is valid - default, encoder or decoder
      valid_module_names = self.adapter_module_names  # Get the list of supported adapter modules from property
      if module_name not in valid_module_names:
          raise ValueError(f"Provided module name `{module_name}` is not in valid list : {valid_module_names}")

      return (module_name, adapter_name)

  def _get_global_cfg(self):
      # Utility method to get a default "global" adapter config (can be given any value by the user in this config)
      global_config = DictConfig({})
      if 'adapters' in self.cfg and self.adapter_global_cfg_key in self.cfg.adapters:
          global_config = self.adapter_cfg[self.adapter_global_cfg_key]
      return global_config

  @property
  def adapter_module_names(self) -> List[str]:
      module_names = super().adapter_module_names  # "Default" adapter module: ''
      module_names.extend(['encoder', 'decoder'])  # Add support for `encoder` and `decoder` modules
      return module_names

class SimpleModelAdapterGetEnabledAdapters(SimpleModelAdapterAddAdapter):

  def get_enabled_adapters(self) -> List[str]:
      enabled_adapters = super().get_enabled_adapters()

      # Forward the method call to the individual modules
      if isinstance(self.encoder, AdapterModuleMixin):
          encoder_adapters = self.encoder.get_enabled_adapters()
          enabled_adapters.extend(encoder_adapters)

      if isinstance(self.decoder, AdapterModuleMixin):
          decoder_adapters = self.decoder.get_enabled_adapters()
          enabled_adapters.extend(decoder_adapters)

      return enabled_adapters

class SimpleModelAdapterSetEnabledAdapters(SimpleModelAdapterGetEnabledAdapters):

  def set_enabled_adapters(self, name: Optional[str] = None, enabled: bool = True):
      # check if valid model with some adapter support
      super().set_enabled_adapters(name, enabled)

      # Resolve module name and adapter name
      if name is not None:
          module_name, _ = self.resolve_adapter_module_name_(name)
      else:
          module_name = None

      # Try to retrieve global adapter config
      global_config = self._get_global_cfg()

      # Forward the method call to the individual modules
      # Note the OR checks - 
      # if module_name is None - ie explicitly None was passed, set the state for all modules
      # if module name was '' or 'encoder, or if `global_cfg.encoder_adapter` was true, or module_name was '' or 'encoder', forward to encoder.
      # if `global_cfg.decoder_adapter` was true, or module_name was 'decoder', forward to decoder.
      # The user can chose to simplify this logic, or add more complex logic as required.
      if name is None or global_config.get('encoder_adapter', True) or module_name in ('', 'encoder'):
        if self.encoder.is_adapter_available():
          self.encoder.set_enabled_adapters(name, enabled)

      if name is None or global_config.get('decoder_adapter', False) or module_name == 'decoder':
        if self.decoder.is_adapter_available():
          self.decoder.set_enabled_adapters(name, enabled)

from fusedadapters.utils import logging, logging_mode

class SimpleModelAdapterFinal(SimpleModelAdapterSetEnabledAdapters):

  def check_valid_model_with_adapter_support_(self):
      global_cfg = DictConfig({})
      if self.adapter_global_cfg_key in self.adapter_cfg:
          global_cfg = self.adapter_cfg[self.adapter_global_cfg_key]

      encoder_adapter = global_cfg.get('encoder_adapter', True)
      decoder_adapter = global_cfg.get('decoder_adapter', False)

      if encoder_adapter and not hasattr(self, 'encoder'):
          logging.warning("Encoder not available", mode=logging_mode.ONCE)
      elif encoder_adapter and not isinstance(self.encoder, AdapterModuleMixin):
          logging.warning("Encoder does not support adapters !", mode=logging_mode.ONCE)

      if decoder_adapter and not hasattr(self, 'decoder'):
          logging.warning("Decoder is not available", mode=logging_mode.ONCE)
      elif decoder_adapter and not isinstance(self.decoder, AdapterModuleMixin):
          logging.warning("Decoder does not support adapters !", mode=logging_mode.ONCE)

# Note how we added `SimpleModelAdapterFinal` to the class inheritance scheme.
# The only other change is the addition of `self.setup_adapters()` to the __init__ method.
class SimpleModel(ModelPT, SimpleModelAdapterFinal):
    def __init__(self, cfg, trainer=None):
        super().__init__(cfg, trainer=trainer)

        self.encoder = instantiate(cfg.encoder)  # type: ResidualMLP
        self.decoder = instantiate(cfg.decoder)  # type: ResidualMLP
        self.projection = nn.Linear(self.decoder.dim, cfg.out_features)

        # NOTE: The only important change - calling `setup_adapters()` !
        self.setup_adapters()

    def forward(self, x):
        y = self.encoder(x)
        z = self.decoder(y)
        out = self.projection(z)
        return out

    def list_available_models(cls):
        return []

    def setup_training_data(self, train_data_config):
        pass

    def setup_validation_data(self, val_data_config):
        pass

old_config = get_model_config(dim)
model = SimpleModel(old_config)
model.summarize()

# This cell will error out if uncommented
# model.add_adapter("decoder:adapter_1", cfg=adapter_modules.LinearAdapterConfig(in_features=dim, dim=5))

def get_adapter_model_config() -> DictConfig:
  config = get_model_config()

  # Find the metadata in the registry, and get the correct adapter capable class path
  enc_adapter_metadata = adapter_mixins.get_registered_adapter(config.encoder._target_)
  if enc_adapter_metadata is not None:
      print("Updated encoder to support adapters !")
      config.encoder._target_ = enc_adapter_metadata.adapter_class_path

  # Find the metadata in the registry, and get the correct adapter capable class path
  dec_adapter_metadata = adapter_mixins.get_registered_adapter(config.decoder._target_)
  if dec_adapter_metadata is not None:
      print("Updated decoder to support adapters !")
      config.decoder._target_ = dec_adapter_metadata.adapter_class_path

  return config

new_config = get_adapter_model_config()
model = SimpleModel(new_config)
model.summarize()

model.add_adapter('decoder:adapter_1', cfg=adapter_modules.LinearAdapterConfig(in_features=dim, dim=5))

print("Encoder adapter available :", model.encoder.is_adapter_available())
print("Decoder adapter available :", model.decoder.is_adapter_available())
print("Decoder adapter(s) :", model.decoder.get_enabled_adapters())

model.summarize()

# disable all adapters, enable just one adapter that we want to train
model.set_enabled_adapters(enabled=False)
model.set_enabled_adapters('adapter_1', enabled=True)  # note : we directly use the adapter_name of adapter_1

# freeze all the weights, unfreeze just the enabled adapters
model.freeze()
model.unfreeze_enabled_adapters()

print()
model.summarize()

model.save_to('full_model.nemo')

new_model = ModelPT.restore_from('full_model.nemo')

new_model.decoder.get_enabled_adapters()

model.save_adapters('adapters.pt', name=None)

new_config = get_adapter_model_config()
model_2 = SimpleModel(new_config)
model_2.summarize()  # no adapters in basic model with adapter support

model_2.load_adapters('adapters.pt', name=None, map_location='cpu')

model_2.freeze()
model_2.unfreeze_enabled_adapters()
model_2.summarize()

model_2.get_enabled_adapters()
