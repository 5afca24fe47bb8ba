"""MLflow logging helpers against a real (SQLite) store."""

from mlflow.tracking import MlflowClient

from pipelines.stagekit import tracking


def test_params_and_metrics_with_class_names_in_their_keys(stores):
    stores()
    with tracking.stage_run("exp", "stage", {"dvc_stage": "x"}) as run:
        run.log_params({"round": {"pseudo_count/Crohn's (left)": 3}})
        run.log_metrics({"test_f1/Crohn's (left)": 0.5}, step=2)
    stored = MlflowClient(tracking.tracking_uri()).get_run(run.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params == {"round.pseudo_count/Crohn_s _left_": "3"}
    assert stored.data.metrics == {"test_f1/Crohn_s _left_": 0.5}
