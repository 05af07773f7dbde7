module github.com/rota-proxy/rota

go 1.26.7
