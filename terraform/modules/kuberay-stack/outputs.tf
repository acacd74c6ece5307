output "monitoring_namespace" {
  description = "Namespace of Prometheus and Grafana."
  value       = helm_release.kube_prometheus_stack.namespace
}

output "kuberay_namespace" {
  description = "Namespace of the KubeRay operator (the NetworkPolicy of infra/k8s lets it reach the Ray pods)."
  value       = helm_release.kuberay_operator.namespace
}
