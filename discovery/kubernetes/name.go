package kubernetes

import (
	"errors"
	"fmt"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"
)

// Name is a Service: its namespace ("" takes the client's default: the
// pod's own, the kubeconfig context's, else "default") and name.
type Name struct {
	Namespace, Name string
}

// ParseName reads a listener's service: "name" or "namespace/name".
func ParseName(s string) (Name, error) {
	ns, name, qualified := strings.Cut(s, "/")
	if !qualified {
		ns, name = "", s
	}
	if qualified {
		if errs := validation.IsDNS1123Label(ns); len(errs) > 0 {
			return Name{}, fmt.Errorf("namespace %q: %s", ns, errs[0])
		}
	}
	if errs := validation.IsDNS1035Label(name); len(errs) > 0 {
		return Name{}, fmt.Errorf("service %q: %s", name, errs[0])
	}
	return Name{Namespace: ns, Name: name}, nil
}

func (n Name) String() string {
	if n.Namespace == "" {
		return n.Name
	}
	return n.Namespace + "/" + n.Name
}

// CheckPortName tells why s cannot name a Service port (an IANA service
// name: at most 15 lower-case letters, digits and hyphens), nil if it can.
// The reason does not repeat s.
func CheckPortName(s string) error {
	if errs := validation.IsValidPortName(s); len(errs) > 0 {
		return errors.New(errs[0])
	}
	return nil
}
