// Package layout checks that rota's imports point one way, as
// docs/DESIGN.md draws them and scripts/layout prints them. It holds only
// that test.
package layout
