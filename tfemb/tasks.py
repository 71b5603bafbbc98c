"""Losses and metrics per task, bundled (as TFRS tasks do), and the compile step every model uses."""

from tfemb._keras import keras

TASKS = ("binary", "multiclass", "regression")


def task_loss(task):
    if task == "binary":
        return keras.losses.BinaryCrossentropy()
    if task == "multiclass":
        return keras.losses.SparseCategoricalCrossentropy()
    if task == "regression":
        return keras.losses.MeanSquaredError()
    raise ValueError(f"task must be one of {TASKS}. Received: task={task!r}")


def task_metrics(task):
    """Binary: AUC, logloss, accuracy, MSE (of the probability, as the AutoEmb/ESAPN papers report);
    multiclass: accuracy, cross-entropy; regression: MSE, MAE."""
    if task == "binary":
        return [
            keras.metrics.AUC(name="auc", num_thresholds=2000),
            keras.metrics.BinaryCrossentropy(name="logloss"),
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.MeanSquaredError(name="mse"),
        ]
    if task == "multiclass":
        return [
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras.metrics.SparseCategoricalCrossentropy(name="cross_entropy"),
        ]
    if task == "regression":
        return [keras.metrics.MeanSquaredError(name="mse"), keras.metrics.MeanAbsoluteError(name="mae")]
    raise ValueError(f"task must be one of {TASKS}. Received: task={task!r}")


OPTIMIZERS = {"adam": keras.optimizers.Adam, "adagrad": keras.optimizers.Adagrad, "sgd": keras.optimizers.SGD,
              "rmsprop": keras.optimizers.RMSprop}


def make_optimizer(name="adam", learning_rate=1e-3, **kwargs):
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}. Received: optimizer={name!r}")
    return OPTIMIZERS[name](learning_rate=learning_rate, **kwargs)


def compile_model(model, optimizer="adam", learning_rate=1e-3, jit_compile=False, **kwargs):
    """Compiles ``model`` with the loss and metrics of its task (``model.task``)."""
    if isinstance(optimizer, str):
        optimizer = make_optimizer(optimizer, learning_rate)
    model.compile(optimizer=optimizer, loss=task_loss(model.task), metrics=task_metrics(model.task),
                  jit_compile=jit_compile, **kwargs)
    return model
