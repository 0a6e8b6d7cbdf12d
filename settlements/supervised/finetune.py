"""Fine tuning: the backbone's upper blocks plus the top model's head, at a very small learning rate.

Starts from the trained :class:`~settlements.supervised.top_model.TopModel` (its head, standardisation
included), so epoch 0 reproduces the top model. Lower blocks stay frozen and batch-norm statistics
stay fixed (the backbone runs in eval mode), which keeps small batches of small tiles stable.
Augmentation: flips, 90-degree rotations and small translations (reflect-pad, then crop), drawn
from a per-tile, per-epoch seed so a run is reproducible. Each epoch writes a checkpoint with the
settings it was made with; a run with the same settings resumes from it (more ``epochs`` extend it).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from rasterio.windows import Window
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..config import FINAL_LAYER, Embedding, FineTuneSettings
from ..embedding.backbones import PooledFeatures, build_backbone, resolve_layer
from ..embedding.infer import to_model_input
from ..errors import ModelFileError, TrainingError
from ..progress import counted
from ..rasters import OpenRasters, RasterInfo, read_tile
from ..store import settings_key
from .top_model import Head, TopModel, balanced_weights, encode, load_state, save_state

log = logging.getLogger(__name__)


class TileImages(Dataset):
    """Model-ready tiles (tile window of each row of ``tiles``), optionally augmented."""

    def __init__(self, infos: list[RasterInfo], tiles: Any, input_size: int, targets: np.ndarray | None = None,
                 augment: bool = False, max_shift: float = 0.0, seed: int = 0) -> None:
        self.infos = infos
        self.windows = tiles[["raster", "tile_col", "tile_row", "tile_w", "tile_h"]].to_numpy(np.int64)
        self.input_size = input_size
        self.targets = targets if targets is not None else np.zeros(len(self.windows), np.int64)
        self.augment = augment
        self.max_shift = max_shift
        self.seed = seed
        self.epoch = 0
        self._src = OpenRasters(infos)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        r, c, row, w, h = (int(v) for v in self.windows[i])
        pixels, _ = read_tile(self._src[r], self.infos[r], Window(c, row, w, h))
        x = to_model_input(pixels, self.input_size)
        if self.augment:
            x = augment(x, np.random.default_rng([self.seed, self.epoch, i]), self.max_shift)
        return x, int(self.targets[i])


def augment(x: torch.Tensor, rng: np.random.Generator, max_shift: float) -> torch.Tensor:
    """Random flips, a 90-degree rotation (square tiles) and a translation of up to ``max_shift``."""
    if rng.random() < 0.5:
        x = x.flip(-1)
    if rng.random() < 0.5:
        x = x.flip(-2)
    if x.shape[-1] == x.shape[-2]:
        x = torch.rot90(x, int(rng.integers(4)), dims=(-2, -1))
    pad = int(round(max_shift * x.shape[-1]))
    if pad:
        h, w = x.shape[-2:]
        padded = F.pad(x[None], (pad, pad, pad, pad), mode="reflect")[0]
        dy, dx = (int(v) for v in rng.integers(0, 2 * pad + 1, size=2))
        x = padded[:, dy: dy + h, dx: dx + w]
    return x.contiguous()


class FineTunedNet(nn.Module):
    def __init__(self, backbone: PooledFeatures, head: Head) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def upper_blocks(model: nn.Module, n: int) -> list[str]:
    """The last ``n`` parameter blocks (e.g. ``body.features.17``), in forward order."""
    blocks: list[str] = []
    for name, _ in model.named_parameters():
        parts = name.split(".")
        block = ".".join(parts[:3]) if len(parts) > 3 and parts[2].isdigit() else ".".join(parts[:2])
        if block not in blocks:
            blocks.append(block)
    return blocks[-n:]


def torch_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


#: The config's defaults (``embedding:`` and ``training.finetune:``), the only place they are written.
_EMBEDDING, _FT = Embedding(), FineTuneSettings()


class FineTuner:
    """Fine tunes ``backbone`` (name, layer, weights) from a fitted top model; ``fit`` returns self."""

    def __init__(self, backbone: str, layer: str | None = None, weights: Path | None = None,
                 input_size: int = _EMBEDDING.input_size, unfreeze: int = _FT.unfreeze, lr: float = _FT.lr,
                 epochs: int = _FT.epochs, patience: int = _FT.patience, batch_size: int = _FT.batch_size,
                 augment: bool = _FT.augment, max_shift: float = _FT.max_shift, seed: int = _FT.seed,
                 device: str = _FT.device, num_workers: int = 0) -> None:
        self.backbone = backbone
        self.layer = resolve_layer(backbone, layer)  # the node itself: a saved model keeps its cut
        self.weights = weights
        self.input_size = input_size
        self.unfreeze = unfreeze
        self.lr = lr
        self.epochs = epochs
        self.patience = patience
        self.batch_size = batch_size
        self.augment = augment
        self.max_shift = max_shift
        self.seed = seed
        self.device = device
        self.num_workers = num_workers

    @classmethod
    def from_settings(cls, e: Embedding, ft: FineTuneSettings) -> FineTuner:
        """The fine tuner a pipeline's ``embedding:`` and ``training.finetune:`` sections describe."""
        return cls(backbone=e.backbone, layer=e.layer, weights=e.weights, input_size=e.input_size,
                   unfreeze=ft.unfreeze, lr=ft.lr, epochs=ft.epochs, patience=ft.patience, batch_size=ft.batch_size,
                   augment=ft.augment, max_shift=ft.max_shift, seed=ft.seed, device=ft.device)

    def params(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self).items() if not k.endswith("_")}

    # learned state: classes_, net_, history_, best_epoch_, trainable_
    def _build(self, top: TopModel) -> FineTunedNet:
        bb = build_backbone(self.backbone, self.layer, self.weights)
        if bb.dim != int(top.head_.mean.shape[0]):
            raise TrainingError(f"training.finetune: the top model expects {int(top.head_.mean.shape[0])}-d "
                                f"features but {self.backbone} at {bb.layer} gives {bb.dim}-d; train it again")
        net = FineTunedNet(bb.model, copy.deepcopy(top.head_))
        self.trainable_ = upper_blocks(net.backbone, self.unfreeze)
        for name, p in net.backbone.named_parameters():
            p.requires_grad = any(name == b or name.startswith(b + ".") for b in self.trainable_)
        return net

    def _train_mode(self, net: FineTunedNet) -> None:
        net.backbone.eval()  # frozen batch-norm statistics
        net.head.train()

    def fit(self, train: TileImages, val: TileImages, top: TopModel, checkpoint: Path | None = None,
            extra: dict[str, Any] | None = None) -> FineTuner:
        """Train on ``train`` (targets = indexes into ``top.classes_``), stop early on ``val`` loss."""
        if len(train) == 0 or len(val) == 0:
            raise TrainingError("training.finetune: training or validation split is empty (too few labelled tiles)")
        self.classes_ = top.classes_
        device = torch_device(self.device)
        # epochs and patience stay out of the key, so a finished run can also be extended
        fixed = {k: v for k, v in self.params().items() if k not in ("epochs", "patience", "num_workers")}
        key = settings_key({"params": fixed, "classes": [str(c) for c in top.classes_], "extra": extra or {},
                            "n_train": len(train), "n_val": len(val)})
        torch.manual_seed(self.seed)
        net = self._build(top).to(device)
        trainable = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.Adam(trainable, lr=self.lr)
        loss_fn = nn.CrossEntropyLoss(weight=balanced_weights(train.targets, len(top.classes_)).to(device))
        state: dict[str, Any] = {"epoch": 0, "best_loss": float("inf"), "best_epoch": 0, "bad_epochs": 0, "history": []}
        best = copy.deepcopy(net.state_dict())
        if checkpoint is not None and checkpoint.exists():
            saved = load_state(checkpoint)
            if saved.get("key") == key:
                net.load_state_dict(saved["model"])
                opt.load_state_dict(saved["optimizer"])
                best, state = saved["best_model"], saved["state"]
                torch.set_rng_state(saved["rng"])
                log.info("fine tuning: resuming %s at epoch %d", checkpoint, state["epoch"])
            else:
                log.info("fine tuning: %s was made with other settings; starting afresh", checkpoint)
        if state["epoch"] == 0:
            state["best_loss"] = self._val_loss(net, val, loss_fn, device)
            state["history"].append({"epoch": 0, "train_loss": None, "val_loss": state["best_loss"]})
            log.info("fine tuning: validation loss %.4f before (the top model)", state["best_loss"])
        while state["epoch"] < self.epochs and state["bad_epochs"] < self.patience:
            epoch = state["epoch"] + 1
            train.epoch = epoch
            loader = DataLoader(train, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                                generator=torch.Generator().manual_seed(self.seed * 1000 + epoch),
                                pin_memory=device.type == "cuda", drop_last=len(train) > self.batch_size)
            self._train_mode(net)
            total, seen = 0.0, 0
            for xb, yb in counted(loader, f"fine tuning epoch {epoch}/{self.epochs}", "batch"):
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                opt.zero_grad()
                loss = loss_fn(net(xb), yb)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(yb)
                seen += len(yb)
            val_loss = self._val_loss(net, val, loss_fn, device)
            state["history"].append({"epoch": epoch, "train_loss": total / max(seen, 1), "val_loss": val_loss})
            if val_loss < state["best_loss"] - 1e-6:
                state.update(best_loss=val_loss, best_epoch=epoch, bad_epochs=0)
                best = copy.deepcopy(net.state_dict())
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch
            log.info("fine tuning epoch %d: train loss %.4f, validation loss %.4f", epoch, total / max(seen, 1),
                     val_loss)
            if checkpoint is not None:
                blob = {"key": key, "params": self.params(), "classes": [str(c) for c in top.classes_],
                        "extra": extra or {}, "model": net.state_dict(), "optimizer": opt.state_dict(),
                        "best_model": best, "state": state, "rng": torch.get_rng_state()}
                save_state(checkpoint, blob)
        net.load_state_dict(best)
        self.net_ = net.eval()
        self.history_ = state["history"]
        self.best_epoch_ = state["best_epoch"]
        return self

    def _val_loss(self, net: FineTunedNet, val: TileImages, loss_fn: nn.Module, device: torch.device) -> float:
        logits = self._logits(net, val, device)
        target = torch.as_tensor(val.targets, device=logits.device)
        return float(loss_fn(logits.to(device), target.to(device)))

    def _logits(self, net: FineTunedNet, data: TileImages, device: torch.device,
                desc: str | None = None) -> torch.Tensor:
        """The net's outputs for every tile of ``data`` (``desc``: counted as progress under that name)."""
        net.eval()
        out = []
        loader = DataLoader(data, batch_size=max(self.batch_size, 128), shuffle=False, num_workers=self.num_workers)
        with torch.inference_mode():
            for xb, _ in loader if desc is None else counted(loader, desc, "batch"):
                out.append(net(xb.to(device)).float().cpu())
        return torch.cat(out) if out else torch.empty((0, len(self.classes_)))

    def predict_proba(self, data: TileImages) -> np.ndarray:
        device = next(self.net_.parameters()).device
        return torch.softmax(self._logits(self.net_, data, device, "fine-tuned model"), dim=1).numpy()

    def predict(self, data: TileImages) -> np.ndarray:
        return self.classes_[self.predict_proba(data).argmax(axis=1)]

    def save(self, path: Path, extra: dict[str, Any] | None = None) -> None:
        """The best model with everything needed to rebuild it."""
        blob = {"params": self.params(), "classes": [str(c) for c in self.classes_], "model": self.net_.state_dict(),
                "history": self.history_, "best_epoch": self.best_epoch_, "trainable": self.trainable_,
                "head_hidden": _head_hidden(self.net_.head), "extra": extra or {}}
        save_state(path, blob)

    @classmethod
    def load(cls, path: Path, backbone: str, layer: str | None, weights: Path | None) -> FineTuner:
        """The model saved at ``path``, built on the pipeline's own backbone, layer and weights file.

        The file is data: its tensors are loaded, but no path it names is opened, and it must have
        been trained on the backbone and layer given here (both resolved to the node they cut at).
        """
        return cls.from_state(load_state(path), path, backbone, layer, weights)

    @classmethod
    def from_state(cls, blob: dict[str, Any], path: Path, backbone: str, layer: str | None,
                   weights: Path | None) -> FineTuner:
        """The fine-tuned network of ``blob`` (as :meth:`save` writes it; read from ``path``), built on the
        pipeline's own backbone, layer and weights file: no path the blob names is used."""
        try:
            params = {**blob["params"], "weights": weights}
            # files that saved a null layer were cut at the final map, the default of their time
            params["layer"] = resolve_layer(params["backbone"], params["layer"] or FINAL_LAYER)
            node = resolve_layer(backbone, layer)
            if (params["backbone"], params["layer"]) != (backbone, node):
                raise ModelFileError(f"{path}: fine tuned from {params['backbone']} at {params['layer']}, but the "
                                     f"pipeline embeds with {backbone} at {node}; train again")
            obj = cls(**params)
            obj.classes_ = np.asarray(blob["classes"], dtype=object).astype(str)
            bb = build_backbone(obj.backbone, obj.layer, obj.weights)
            obj.net_ = FineTunedNet(bb.model, Head(bb.dim, len(obj.classes_), int(blob["head_hidden"])))
            obj.net_.load_state_dict(blob["model"])
            obj.history_, obj.best_epoch_, obj.trainable_ = blob["history"], blob["best_epoch"], blob["trainable"]
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ModelFileError(f"{path}: not a fine-tuned model this version wrote ({type(exc).__name__}); "
                                 "train again") from None
        obj.net_.eval()
        return obj


def _head_hidden(head: Head) -> int:
    return cast(nn.Linear, head.net[0]).out_features if isinstance(head.net, nn.Sequential) else 0


def targets_of(y: np.ndarray, classes: np.ndarray) -> np.ndarray:
    return encode(np.asarray(y).astype(str), classes)
