"""The one nnU-Net trainer of the harness.

``BenchTrainer`` subclasses nnU-Net's ``nnUNetTrainer`` and keeps its data
loading, augmentation, loss, deep supervision and LR schedule. Everything
method-specific is delegated to a ``Method`` object; budget, learning rate,
optimizer and splits come from the run spec via ``setup``. The trainer never
asks which method it holds.
"""
from __future__ import annotations

import math
import os
import time
from os.path import join
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from bench.checkpoint import is_head, match_weights
from bench.engine.step import make_optimizer, training_step
from bench.methods.base import Method, MethodContext, TrainStart
from bench.progress import Task


class BenchTrainer(nnUNetTrainer):
    # nnU-Net records __init__'s arguments from locals(): the signature must stay explicit.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        self.verbose = False  # read by print_to_log_file, which super().__init__ already calls
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.method: Optional[Method] = None
        self.global_step = 0
        self.calibration_passes = 0
        self.step_times: List[float] = []
        self.epoch_callback: Optional[Callable[[int, Dict[str, float]], None]] = None
        self.load_report: Dict[str, List[str]] = {}
        self.bar = Task("training", None)  # bench.engine.train puts a shown progress task here

    def setup(self, *, method: Method, ctx: MethodContext, init_state: Optional[Dict[str, torch.Tensor]],
              train_ids: Sequence[str], val_ids: Sequence[str], preprocessed_base: str, output_folder: str,
              iterations: int, eval_every: int, lr: float, weight_decay: float, optimizer: str,
              batch_size: Optional[int] = None) -> "BenchTrainer":
        self.method, self.ctx, self.init_state = method, ctx, init_state
        self._split = (list(train_ids), list(val_ids or train_ids))
        self.preprocessed_dataset_folder_base = str(preprocessed_base)
        self.preprocessed_dataset_folder = join(str(preprocessed_base), self.configuration_manager.data_identifier)
        self.output_folder_base = str(output_folder)
        self.output_folder = join(str(output_folder), "fold_0")
        os.makedirs(self.output_folder, exist_ok=True)
        self.log_file = join(str(output_folder), "training_log.txt")
        # The budget is forward/backward passes: a method's calibration passes come out of it.
        self.calibration_passes = int(method.calibration_passes())
        self.total_steps = iterations - self.calibration_passes
        if self.total_steps < 1:
            raise ValueError(f"{method.name} spends {self.calibration_passes} calibration passes of the "
                             f"{iterations}-iteration budget, leaving no training step; raise --iterations "
                             f"above {self.calibration_passes}")
        self.steps_per_epoch = max(1, min(eval_every, self.total_steps))
        self.num_iterations_per_epoch = self.steps_per_epoch
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.num_val_iterations_per_epoch = 1
        self.initial_lr, self.weight_decay, self.optimizer_name = lr, weight_decay, optimizer
        if batch_size:
            self.configuration_manager.configuration["batch_size"] = batch_size
        # The harness exports its own stock-loadable checkpoint at the end of a run.
        self.disable_checkpointing = True
        return self

    # --- what nnU-Net asks the trainer ---------------------------------------------------
    def do_split(self):
        return self._split

    def configure_optimizers(self):
        """nnU-Net calls this right after building the network: the place where the foundation
        weights are loaded and the method decides what is trained."""
        fresh = []
        if self.init_state is not None:
            self.load_report = load_weights(self.network, self.init_state)
            fresh = [p for n, p in self.network.named_parameters() if n in set(self.load_report["fresh"])]
        self.network = self.method.prepare(self.network, self.ctx).to(self.device)
        check_fresh_weights_trained(self.method, fresh)
        optimizer = make_optimizer(self.optimizer_name, self.method.param_groups(self.network),
                                   self.initial_lr, self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def on_train_start(self):
        super().on_train_start()
        self.method.on_train_start(TrainStart(self.network, self.dataloader_train, self.loss_on_batch, self.device))
        self.global_step = 0
        self.bar.update(completed=self.calibration_passes)  # they come out of the iteration budget
        self._t_start = time.perf_counter()

    def on_train_epoch_start(self):
        # nnU-Net reads num_iterations_per_epoch after this hook: the last epoch is cut to the budget.
        self.num_iterations_per_epoch = min(self.steps_per_epoch, self.total_steps - self.global_step)
        super().on_train_epoch_start()

    def plot_network_architecture(self):
        pass  # needs hiddenlayer/graphviz; not part of a benchmark run

    def print_to_log_file(self, *args, also_print_to_console=True, add_timestamp=True):
        super().print_to_log_file(*args, also_print_to_console=self.verbose and also_print_to_console,
                                  add_timestamp=add_timestamp)

    def _to_device(self, batch):
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        return data, target

    def loss_on_batch(self, batch) -> torch.Tensor:
        data, target = self._to_device(batch)
        return self.loss(self.network(data), target)

    def train_step(self, batch: dict) -> dict:
        data, target = self._to_device(batch)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        loss = training_step(self.network, self.method, self.optimizer, self.loss, data, target,
                             self.global_step, self.grad_scaler)
        sync()
        self.step_times.append(time.perf_counter() - t0)
        self.global_step += 1
        loss = loss.detach().cpu().numpy()
        self.bar.advance(loss=float(loss))
        return {"loss": loss}

    def on_epoch_end(self):
        # nnU-Net's version also plots a progress PNG and writes checkpoints every epoch;
        # a short fine-tune needs neither, only the numbers.
        self.logger.log("epoch_end_timestamps", time.time(), self.current_epoch)
        scores = {"train_loss": float(self.logger.get_value("train_losses", step=-1)),
                  "val_loss": float(self.logger.get_value("val_losses", step=-1)),
                  "val_pseudo_dice": float(np.nanmean(self.logger.get_value("dice_per_class_or_region", step=-1)))}
        self.bar.update(**{"tune pseudo-Dice": scores["val_pseudo_dice"]})
        if self.epoch_callback is not None:
            self.epoch_callback(self.current_epoch, scores)
        self.current_epoch += 1


def load_weights(network: torch.nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, List[str]]:
    """Load foundation weights by name and shape. Segmentation heads are loaded when their
    shape matches (same label set), unlike nnU-Net's -pretrained_weights which always skips
    them; anything else that does not match is an error naming the layers (bench.checkpoint)."""
    own = network.state_dict()
    loaded, reinit = match_weights({k: tuple(v.shape) for k, v in own.items()}, state)
    network.load_state_dict({k: state[k] for k in loaded}, strict=False)
    # "fresh": what the checkpoint never held (a self-supervised encoder's missing decoder), heads aside
    return {"loaded": loaded, "reinitialised": reinit, "fresh": [k for k in reinit if not is_head(k)]}


def check_fresh_weights_trained(method, fresh: List[torch.nn.Parameter]) -> None:
    """Refuse a method that would keep never-trained weights frozen (e.g. linear probing on a
    self-supervised encoder, whose decoder is random): its result would measure a random decoder."""
    frozen = sum(1 for p in fresh if not p.requires_grad)
    if frozen:
        raise ValueError(f"{method.name} keeps {frozen} of the {len(fresh)} tensors the foundation checkpoint "
                         "never trained (its decoder) frozen at their random initialisation. Use a method that "
                         "trains the decoder (full, dgst, decoder, l2sp), or a foundation with a trained decoder.")
