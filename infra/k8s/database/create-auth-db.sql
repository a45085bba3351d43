-- The basic-auth app's users and permissions, in a database of their own beside the runs' (mlflow).
CREATE DATABASE mlflow_auth;
