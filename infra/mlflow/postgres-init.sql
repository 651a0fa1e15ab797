-- Run once by PostgreSQL's first start (docker-entrypoint-initdb.d): the official image creates the tracking
-- database from POSTGRES_DB (`mlflow`); MLflow's basic-auth app keeps its users in a database of its own.
CREATE DATABASE mlflow_auth;
