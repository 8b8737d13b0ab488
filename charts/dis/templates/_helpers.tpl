{{- define "dis.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dis.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dis.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "dis.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one role: (dict "ctx" $ "role" "api") */}}
{{- define "dis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dis.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .role }}
{{- end }}

{{- define "dis.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dis.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "dis.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The Secret the pods read: the operator's, or the one this chart makes. */}}
{{- define "dis.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else }}
{{- printf "%s-secrets" (include "dis.fullname" .) }}
{{- end }}
{{- end }}

{{/* Every host name the API answers to (DJANGO_ALLOWED_HOSTS). */}}
{{- define "dis.allowedHosts" -}}
{{- $hosts := list "localhost" (printf "%s-api" (include "dis.fullname" .)) (printf "%s-api.%s.svc" (include "dis.fullname" .) .Release.Namespace) (printf "%s-api.%s.svc.cluster.local" (include "dis.fullname" .) .Release.Namespace) }}
{{- if .Values.ingress.enabled }}
{{- range .Values.ingress.hosts }}
{{- $hosts = append $hosts .host }}
{{- end }}
{{- end }}
{{- range .Values.allowedHosts }}
{{- $hosts = append $hosts . }}
{{- end }}
{{- join "," (uniq $hosts) }}
{{- end }}

{{/* What every container of the service gets: config, secrets, env. */}}
{{- define "dis.env" -}}
envFrom:
  - configMapRef:
      name: {{ include "dis.fullname" . }}-config
env:
  - name: DJANGO_SECRET_KEY_FILE
    value: /var/run/secrets/dis/DJANGO_SECRET_KEY
  - name: DIS_ENCRYPTION_KEYS_FILE
    value: /var/run/secrets/dis/DIS_ENCRYPTION_KEYS
  {{- range list "DATABASE_URL" "CELERY_BROKER_URL" "REDIS_URL" }}
  - name: {{ . }}
    valueFrom:
      secretKeyRef:
        name: {{ include "dis.secretName" $ }}
        key: {{ . }}
  {{- end }}
  {{- if .Values.metrics.token }}
  - name: DIS_METRICS_TOKEN
    valueFrom:
      secretKeyRef:
        name: {{ include "dis.secretName" . }}
        key: DIS_METRICS_TOKEN
  {{- end }}
  {{- with .Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{- define "dis.volumeMounts" -}}
volumeMounts:
  - name: secrets
    mountPath: /var/run/secrets/dis
    readOnly: true
  - name: tmp
    mountPath: /tmp
{{- end }}

{{- define "dis.volumes" -}}
volumes:
  - name: secrets
    secret:
      secretName: {{ include "dis.secretName" . }}
      items:
        - key: DJANGO_SECRET_KEY
          path: DJANGO_SECRET_KEY
        - key: DIS_ENCRYPTION_KEYS
          path: DIS_ENCRYPTION_KEYS
  - name: tmp
    emptyDir:
      sizeLimit: {{ .Values.tmpSizeLimit }}
{{- end }}

{{/* The pod template's shared part: (dict "ctx" $ "role" "worker") */}}
{{- define "dis.podMeta" -}}
labels:
  {{- include "dis.selectorLabels" (dict "ctx" .ctx "role" .role) | nindent 2 }}
annotations:
  checksum/config: {{ include (print .ctx.Template.BasePath "/configmap.yaml") .ctx | sha256sum }}
  {{- if not .ctx.Values.secrets.existingSecret }}
  checksum/secrets: {{ include (print .ctx.Template.BasePath "/secret.yaml") .ctx | sha256sum }}
  {{- end }}
  {{- with .ctx.Values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{- define "dis.podCommon" -}}
serviceAccountName: {{ include "dis.serviceAccountName" . }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Waits until the database has every migration of this image. */}}
{{- define "dis.waitForMigrations" -}}
initContainers:
  - name: wait-for-migrations
    image: {{ include "dis.image" . }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    args: ["wait-for-migrations"]
    securityContext:
      {{- toYaml .Values.securityContext | nindent 6 }}
    {{- include "dis.env" . | nindent 4 }}
      - name: DIS_MIGRATIONS_TIMEOUT
        value: {{ .Values.migrations.timeoutSeconds | quote }}
    {{- include "dis.volumeMounts" . | nindent 4 }}
    resources:
      {{- toYaml .Values.migrations.resources | nindent 6 }}
{{- end }}
