DROP TABLE provider_paces;
