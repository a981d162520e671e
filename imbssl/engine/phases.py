"""Data phases: where the labeled set or the starting weights come from somewhere other
than the dataset and a fresh network. ``init_from`` loads a finished run's weights before the
first step (cRT); ``labeled_update_due`` / ``update_labeled_set`` replace the labeled set with
pseudo-labeled unlabeled images between steps (CReST's generations), optionally restarting
network, EMA and optimizer; ``phase_switch_due`` / ``switch_phase`` start a method's next
phase between steps (CoSSL's classifier warm-up before co-learning). The trainer calls these hooks without knowing the method."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from imbssl.data.device_loader import TensorSet, make_stream
from imbssl.diagnostics.metrics import confusion_to_metrics, per_class_rows
from imbssl.engine.checkpoint import latest_checkpoint, load_checkpoint, newest_loadable
from imbssl.engine.state import check_compatible
from imbssl.errors import UserError


class DataPhases:
    """Labeled-set updates and init-from weights (a part of
    :class:`imbssl.engine.trainer.Trainer`; owns ``initial_labeled``, ``labeled_added``; replaces
    ``data.labeled`` and ``labeled_stream``)."""

    def _load_init_weights(self, source: str) -> None:
        """The network and EMA weights of ``source`` (a checkpoint file, or a run folder:
        its newest good checkpoint), as the algorithm's ``load_init_weights`` takes them."""
        path = Path(source).expanduser()
        if path.is_dir():
            ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
            if latest_checkpoint(ckpt_dir) is None:
                raise UserError(f"init_from={source}: no checkpoint in {ckpt_dir}; pass a run "
                                "folder or RUN/checkpoints/ckpt_<step>.pt")
            path, state, _ = newest_loadable(ckpt_dir, "cpu")
        elif path.is_file():
            state = load_checkpoint(path)
        else:
            raise UserError(f"init_from={source} does not exist; pass a run folder or "
                            "RUN/checkpoints/ckpt_<step>.pt")
        check_compatible(state, self.data.num_classes, self.mcfg.name, None, self.mcfg.norm)
        try:
            self.algo.load_init_weights(self.model, self.ema.model, state)
        except (RuntimeError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"init_from={path}: its weights do not fit the configured network "
                            f"({first[:200]})") from None

    @torch.no_grad()
    def unlabeled_probs(self) -> Tensor:
        """(N_u, K) softmax of the EMA model's predictions (``label_predictor``: the role that
        labels data, not the evaluated one) on the unaugmented unlabeled set (eval mode; every
        process computes all of it, so all agree)."""
        model, images = self.ema.model, self.data.unlabeled.images
        predict = self.algo.label_predictor(model)
        was_training = model.training
        model.eval()
        out = []
        for start in range(0, len(images), self.tcfg.eval_batch_size):
            x = self._prepare(self.data.augmenter.normalize(
                images[start:start + self.tcfg.eval_batch_size]))
            with self.autocast():
                logits = predict(model(x))
            out.append(torch.softmax(logits.float(), dim=-1))
        model.train(was_training)
        return torch.cat(out)

    def switch_phase(self) -> None:
        """The algorithm's next phase starts (``switch_phase`` on the network and its EMA);
        what it reports goes to metrics.jsonl (split ``phase``)."""
        logs = self.algo.switch_phase(self.model, self.ema.model)
        self._append_metrics({"step": self.step_count, "split": "phase", **logs})

    def update_labeled_set(self) -> None:
        """Ask the algorithm for its new labeled set, switch the labeled stream to it (and
        restart network, EMA and optimizer if asked); log the additions per class."""
        update = self.algo.update_labeled_set(self.unlabeled_probs(), self.step_count,
                                              self.tcfg.iterations)
        self._set_labeled_added(update.indices, update.labels)
        stream = self.labeled_stream
        seed = int(torch.randint(2**62, (1,), generator=stream.generator))
        self.labeled_stream = make_stream(self.data.labeled, stream.batch_size, seed,
                                          self.device, self.algo.labeled_sampling)
        if update.restart:
            self._restart_network()
        self._log_labeled_update(update)

    def _set_labeled_added(self, indices: Tensor, labels: Tensor) -> None:
        """``data.labeled`` := the initial labeled set + unlabeled ``indices`` as ``labels``."""
        indices = indices.long().to(self.device)
        labels = labels.long().to(self.device)
        self.labeled_added = {"indices": indices.cpu(), "labels": labels.cpu()}
        init, unl = self.initial_labeled, self.data.unlabeled
        self.data.labeled = TensorSet(torch.cat([init.images, unl.images[indices]]),
                                      torch.cat([init.labels, labels]))

    def _load_labeled_added(self, added: dict | None) -> None:
        """Rebuild the labeled set (and a stream over it) from a checkpoint's additions."""
        if added is None:
            return
        self._set_labeled_added(added["indices"], added["labels"])
        self.labeled_stream = make_stream(self.data.labeled, self.labeled_stream.batch_size, 0,
                                          self.device, self.algo.labeled_sampling)

    def _restart_network(self) -> None:
        """Fresh weights (global RNG), EMA = the fresh network, empty optimizer state."""
        fresh = self._new_model()
        self.model.load_state_dict(fresh.state_dict())
        self.ema.model.load_state_dict(self.model.state_dict())
        self.optimizer.state.clear()
        self.algo.configure_network(self.model)

    def _log_labeled_update(self, update) -> None:
        """metrics.jsonl: how many were added; per_class.csv (source ``labeled_set``): the
        added images' pseudo-labels against their true classes; labeled_added_<step>.npy:
        that K x K matrix (rows: true class, columns: pseudo-label)."""
        if self.log is None:
            return
        k = self.data.num_classes
        true = self.data.unlabeled.labels[update.indices.to(self.device)].cpu()
        known = true >= 0  # STL-10's unlabeled images have no label
        conf = torch.bincount(true[known] * k + update.labels.cpu()[known],
                              minlength=k * k).view(k, k).numpy()
        self._append_metrics({"step": self.step_count, "split": "labeled_set",
                              "added": len(update.indices), "labeled": len(self.data.labeled),
                              "restart": int(update.restart)})
        self.log.append_per_class(per_class_rows(self.step_count, "labeled_set", "added", "all",
                                                 confusion_to_metrics(conf),
                                                 self.data.class_names))
        self.log.write_confusion(conf, f"labeled_added_{self.step_count:08d}.npy")
