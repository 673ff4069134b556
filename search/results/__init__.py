"""The results room: held-out comparison and its statistics, the reference recipes, the Pareto front, the
summary and report files, MLflow tracking, the dashboard and export."""
