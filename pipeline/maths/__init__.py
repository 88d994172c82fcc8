"""The maths, torch and numpy only (no Ray, no storage, no MLflow), so that it runs
wherever torch does, a GPU machine included: EDM's preconditioning, loss and
schedule (`edm`), exact denoisers of known laws (`analytic`), the training step
(`train_step`), EMA (`ema`), the UNet and its architecture (`unet`,
`architecture`), the solvers (`solvers`), batch-independent generation
(`reproducible`), the metrics (`metrics`, `inception`) and the small classifier
behind label fidelity and CAS (`classifier`). `architecture` needs no torch:
configs import it."""
