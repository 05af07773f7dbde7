// Package browser tests rota's status page in a real browser (Chromium,
// driven by chromedp). It is a module of its own so that the browser
// driver is not a dependency of rota's: `make test` runs it beside the
// main module's tests.
package browser
